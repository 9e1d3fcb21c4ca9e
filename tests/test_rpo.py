"""RPO numerics: on-policy ratio, rewards, loss, data-parallel equality, NaN handling."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_trainer

from arr_jax.rpo.loss import ppo_clip_loss
from arr_jax.rpo.rewards import pair_rewards
from arr_jax.rpo.trainer import NonFiniteLossError, RPOSettings

PROMPTS = ["two red circles on the left", "one blue square on the top",
           "three green triangles on the right", "one yellow circle on the bottom"]


def _batch(trainer, prompts=PROMPTS, it=0):
    batch = trainer.rollout(prompts, jax.random.fold_in(trainer.key, it))
    adv, jm = trainer.judge_batch(batch)
    return batch, adv, jm


def test_pair_rewards():
    r = pair_rewards(np.array([1, 2, 0]))
    np.testing.assert_allclose(r, [[1.0, -0.1], [-0.1, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="winner values"):
        pair_rewards(np.array([3]))


def test_ppo_clip_loss_matches_formula():
    logp_new = jnp.array([0.0, 0.5, -0.5, 0.1])
    logp_old = jnp.zeros(4)
    adv = jnp.array([1.0, 1.0, -0.1, -0.1])
    loss, ratio, clipped = ppo_clip_loss(logp_new, logp_old, adv, 0.2)
    rho = np.exp(np.asarray(logp_new))
    expect = np.maximum(-np.asarray(adv) * rho, -np.asarray(adv) * np.clip(rho, 0.8, 1.2))
    np.testing.assert_allclose(np.asarray(loss), expect, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped), [0.0, 1.0, 1.0, 0.0])


def test_on_policy_ratio_is_exactly_one_at_every_trained_step():
    """First optimiser step of a rollout batch: rho == 1 exactly for every sample and trained step."""
    tr = make_tiny_trainer(pairs_per_batch=4, micro_batch=4, num_steps=4, ppo_epochs=1, steps_per_update=0)
    assert list(tr.s.trained_steps()) == [0, 1, 2]  # all but the last
    batch, _, _ = _batch(tr)
    adv = np.linspace(-0.1, 1.0, 8).astype(np.float32)  # nonzero gradients everywhere
    m = tr.update(batch, adv, np.random.default_rng(0))
    assert m["optimizer_steps"] == 1
    assert m["ratio_max_dev_first_step"] == 0.0 and m["ratio_mean"] == 1.0 and m["ratio_std"] == 0.0
    assert m["grad_norm"] > 0 and m["clip_frac"] == 0.0
    # the rollout's own log-probs agree to float rounding (they come from a forward-only program)
    assert m["logp_mismatch"] < 1e-5
    # several optimiser steps per batch (one per trained step, 3 epochs): later steps are off-policy
    tr2 = make_tiny_trainer(pairs_per_batch=4, micro_batch=4, num_steps=4, ppo_epochs=3, steps_per_update=1,
                            learning_rate=1e-2)
    b2, _, _ = _batch(tr2)
    m2 = tr2.update(b2, adv, np.random.default_rng(0))
    assert m2["optimizer_steps"] == 9 and m2["ratio_max_dev_first_step"] == 0.0
    assert m2["ratio_max_dev"] > 0.0


def test_lora_off_reference_is_the_base_model():
    tr = make_tiny_trainer()
    batch, _, _ = _batch(tr)
    steps = jnp.asarray(tr.s.trained_steps())
    cond = jax.tree.map(lambda c: c[0], batch.cond)
    on = tr.programs.logp_pass(tr.trainable, tr.frozen, cond, batch.latents[0], steps)
    off = tr.programs.logp_pass(tr.ref_trainable, tr.frozen, cond, batch.latents[0], steps)
    assert float(jnp.max(jnp.abs(on - off))) > 0  # adapters are nonzero
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(tr.ref_trainable))


@pytest.mark.slow
@pytest.mark.parametrize("kl_type", ["k1", "gaussian"])
def test_data_parallel_update_equals_single_device(kl_type):
    from arr_jax.sharding import make_mesh, make_rules

    single = make_tiny_trainer(pairs_per_batch=8, micro_batch=8, kl_type=kl_type, ppo_epochs=2)
    batch, adv, _ = _batch(single, PROMPTS * 2)
    adv = np.linspace(-0.1, 1.0, adv.size).astype(np.float32)
    host = dataclasses.replace(batch, latents=np.asarray(batch.latents), logp_old=np.asarray(batch.logp_old),
                               cond=jax.device_get(batch.cond))

    rules = make_rules(make_mesh(data=4, fsdp=2, tensor=1))
    dp = make_tiny_trainer(pairs_per_batch=8, micro_batch=8, kl_type=kl_type, ppo_epochs=2, rules=rules)
    dp_batch = dataclasses.replace(host, latents=dp._put(host.latents, 2), logp_old=dp._put(host.logp_old, 2),
                                   cond=jax.tree.map(jnp.asarray, host.cond))
    m1 = single.update(host, adv, np.random.default_rng(0))
    m2 = dp.update(dp_batch, adv, np.random.default_rng(0))
    assert len(dp.trainable["transformer_blocks"][0]["attn"]["to_q"]["lora_a"].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(single.trainable), jax.tree.leaves(dp.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    for k in ("loss", "kl", "grad_norm", "ratio_mean"):
        assert abs(m1[k] - m2[k]) <= 1e-6 * max(1.0, abs(m1[k])), k


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_loss_policy(policy):
    tr = make_tiny_trainer(nan_policy=policy)
    batch, adv, _ = _batch(tr)
    adv = adv.copy()
    adv[0] = np.nan
    before = jax.tree.map(np.asarray, tr.trainable)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="nan_policy='skip'"):
            tr.update(batch, adv, np.random.default_rng(0))
        return
    m = tr.update(batch, adv, np.random.default_rng(0))
    assert m["nonfinite_updates_total"] == 1 and tr.counters["nonfinite_updates"] == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(tr.trainable)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="clip_eps"):
        RPOSettings(clip_eps=1.5).validate()
    with pytest.raises(ValueError, match="micro_batch"):
        RPOSettings(pairs_per_batch=3, micro_batch=4).validate()
    with pytest.raises(ValueError, match="train_window"):
        RPOSettings(num_steps=4, train_window=(0, 4)).validate()
    with pytest.raises(ValueError, match="kl_type"):
        RPOSettings(kl_type="k3").validate()


def test_one_iteration_logs_the_metrics():
    tr = make_tiny_trainer(ppo_epochs=2)
    m = tr.step(PROMPTS)
    for k in ("reward_mean", "tie_rate", "decisive_rate", "clip_frac", "ratio_mean", "ratio_std", "kl",
              "grad_norm", "criteria/colour", "time/rollout", "time/decode", "time/judge", "time/reference",
              "time/update", "throughput/images_per_s", "throughput/update_sample_steps_per_s"):
        assert k in m and np.isfinite(m[k]), k
    assert tr.iteration == 1
    # achieved TFLOP/s of every jitted program, compile seconds on the first iteration, no MFU on CPU
    for phase in ("rollout", "reference", "update"):  # (the pixel-space decode has no matmuls)
        assert m[f"perf/{phase}_tflop_s"] > 0, phase
    assert m["compile/update_s"] > 0 and not any(k.endswith("_mfu") for k in m)
    m2 = tr.step(PROMPTS)
    assert "compile/update_s" not in m2 and m2["perf/update_tflop_s"] > 0
