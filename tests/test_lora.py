"""LoRA on the Flux transformer: targeting, reference policy via lora_off, optimizer selection."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from arr_jax.models.flux import FluxConfig, FluxTransformer, init_flux
from arr_jax.nn.lora import LoRAConfig, LoRAParam, count_params, lora_off, split_lora
from arr_jax.nn_filters import base_param_filter

LORA = LoRAConfig(rank=4, alpha=8.0)
SMALL = FluxConfig.tiny(num_layers=1, num_single_layers=1)  # for the (slower to compile) gradient tests


def _inputs(b=2, n=6, l=3):
    k = jax.random.split(jax.random.key(1), 5)
    cfg = FluxConfig.tiny()
    img_ids = jnp.stack([jnp.zeros(n), jnp.arange(n) // 3, jnp.arange(n) % 3], -1)
    return dict(img=jax.random.normal(k[0], (b, n, cfg.in_channels)),
                txt=jax.random.normal(k[1], (b, l, cfg.joint_attention_dim)),
                pooled=jax.random.normal(k[2], (b, cfg.pooled_projection_dim)),
                timestep=jax.random.uniform(k[3], (b,)), img_ids=img_ids, txt_ids=jnp.zeros((l, 3)),
                guidance=jnp.full((b,), 3.5))


@pytest.fixture(scope="module")
def models():
    base = FluxTransformer(FluxConfig.tiny(), rngs=nnx.Rngs(0))
    tuned = FluxTransformer(FluxConfig.tiny(lora=LORA), rngs=nnx.Rngs(7))
    nnx.update(tuned, nnx.state(base, nnx.Param))  # same base weights, LoRA kept
    return base, tuned


def _forward(graphdef):
    return jax.jit(lambda lora, rest, x: nnx.merge(graphdef, lora, rest)(**x))


def test_targets_and_counts(models):
    _, tuned = models
    _, lora, rest = split_lora(tuned)
    cfg = FluxConfig.tiny()
    d = cfg.inner_dim
    # 8 adapted projections per double block (all d -> d), 3 per single block (q, k, v).
    n_linear = 8 * cfg.num_layers + 3 * cfg.num_single_layers
    assert count_params(lora, LoRAParam) == n_linear * LORA.rank * (d + d)
    assert count_params(tuned, LoRAParam) == count_params(lora, LoRAParam)
    assert count_params(rest, nnx.Param) == count_params(models[0], nnx.Param)
    q = tuned.transformer_blocks[0].attn.to_q
    assert q.lora_a.get_metadata()["axes"] == ("embed", "lora_rank")
    assert q.lora_b.get_metadata()["axes"] == ("lora_rank", "heads")
    assert tuned.single_transformer_blocks[0].proj_mlp.lora_a is None
    assert tuned.transformer_blocks[0].ff.net[0].proj.lora_a is None
    assert q.lora_scale == LORA.alpha / LORA.rank
    # PEFT init: B == 0, A ~ U(-1/sqrt(in), 1/sqrt(in)) and nonzero.
    assert not np.any(np.asarray(q.lora_b[...]))
    a = np.asarray(q.lora_a[...])
    assert np.abs(a).max() <= 1 / np.sqrt(d) and np.abs(a).max() > 0.5 / np.sqrt(d)


def test_bad_target_is_an_error():
    with pytest.raises(ValueError, match="matched no Linear"):
        FluxTransformer(FluxConfig.tiny(lora=LoRAConfig(targets=("attn.to_qq",))), rngs=nnx.Rngs(0))


def test_lora_off_is_exactly_the_base_model(models):
    base, tuned = models
    x = _inputs()
    g_base, s_base = nnx.split(base)
    want = np.asarray(jax.jit(lambda s, x: nnx.merge(g_base, s)(**x))(s_base, x))

    graphdef, lora, rest = split_lora(tuned)
    forward = _forward(graphdef)
    # Fresh adapters (B = 0) do not change the output.
    np.testing.assert_array_equal(np.asarray(forward(lora, rest, x)), want)

    # Trained adapters (B != 0) do ...
    keys = iter(jax.random.split(jax.random.key(3), 100))
    trained = jax.tree.map(lambda v: v.replace(0.1 * jax.random.normal(next(keys), v.get_value().shape)),
                           lora, is_leaf=lambda v: isinstance(v, nnx.Variable))
    changed = np.asarray(forward(trained, rest, x))
    assert np.abs(changed - want).max() > 1e-3

    # ... and lora_off gives back the reference policy bit for bit, from the same weights.
    off = lora_off(trained)
    assert all(isinstance(v, LoRAParam) for v in jax.tree.leaves(off, is_leaf=lambda v: isinstance(v, nnx.Variable)))
    np.testing.assert_array_equal(np.asarray(forward(off, rest, x)), want)


def test_optimizer_updates_only_lora():
    model = FluxTransformer(SMALL.replace(lora=LORA, remat=True), rngs=nnx.Rngs(0))
    x = _inputs()
    target = jnp.ones_like(x["img"])
    before_base = jax.tree.map(np.asarray, nnx.state(model, base_param_filter()))
    before_lora = jax.tree.map(np.asarray, nnx.state(model, LoRAParam))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=LoRAParam)

    def loss_fn(m):
        return jnp.mean((m(**x) - target) ** 2)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(m)
        opt.update(m, grads)
        return loss

    l0 = step(model, opt)
    l1 = step(model, opt)
    assert float(l1) < float(l0)
    after_base = nnx.state(model, base_param_filter())
    after_lora = nnx.state(model, LoRAParam)
    jax.tree.map(np.testing.assert_array_equal, before_base, jax.tree.map(np.asarray, after_base))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - np.asarray(b)).max(), before_lora, after_lora))
    assert min(diffs) > 0  # every adapter (A and B) moved


def test_remat_gives_same_gradients():
    x = _inputs()

    def grads(remat):
        model = FluxTransformer(SMALL.replace(lora=LORA, remat=remat), rngs=nnx.Rngs(0))
        graphdef, lora, rest = split_lora(model)
        lora = jax.tree.map(lambda v: v.replace(v.get_value() + 0.01), lora,
                            is_leaf=lambda v: isinstance(v, nnx.Variable))
        loss = lambda lo: jnp.sum(nnx.merge(graphdef, lo, rest)(**x) ** 2)
        return jax.jit(jax.grad(loss))(lora)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads(False), grads(True))


@pytest.mark.slow
def test_init_flux_matches_eager_init():
    """The jitted (shardable) init draws the same weights as building the module eagerly."""
    cfg = SMALL.replace(lora=LORA)
    want = nnx.state(FluxTransformer(cfg, rngs=nnx.Rngs(3)))
    got = nnx.state(init_flux(cfg, seed=3))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, got)


@pytest.mark.parity
@pytest.mark.parametrize("shape", [(2, 5, 12), (3, 12)], ids=["tokens", "vectors"])
def test_lora_delta_gradients_match_torch_autograd(shape):
    """`lora_delta`'s hand-written backward (small operands transposed) = torch autograd of scale*(x@A)@B."""
    torch = pytest.importorskip("torch")
    from arr_jax.nn.layers import lora_delta

    rng = np.random.default_rng(0)
    x, a, b = (rng.standard_normal(s).astype(np.float32) for s in (shape, (shape[-1], 4), (4, 7)))
    g = rng.standard_normal(shape[:-1] + (7,)).astype(np.float32)
    out, vjp = jax.vjp(lambda x, a, b: lora_delta(x, a, b, 0.5), x, a, b)
    ours = vjp(jnp.asarray(g))
    tx, ta, tb = (torch.tensor(v, requires_grad=True) for v in (x, a, b))
    ref = 0.5 * (tx @ ta) @ tb
    ref.backward(torch.tensor(g))
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ours, (tx.grad, ta.grad, tb.grad)):
        np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), rtol=1e-5, atol=1e-5)
    # and it is JAX's own autodiff of the same expression
    auto = jax.vjp(lambda x, a, b: 0.5 * ((x @ a) @ b), x, a, b)[1](jnp.asarray(g))
    for mine, theirs in zip(ours, auto):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=2e-6, atol=2e-6)
