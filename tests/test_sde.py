"""The flow SDE step against a torch transcription of DanceGRPO's ``flux_step`` (SPEC §2)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arr_jax.diffusion.rollout import sde_rollout, step_log_prob
from arr_jax.diffusion.schedule import rollout_sigmas, shift_sigmas
from arr_jax.diffusion.sde import gaussian_kl, sde_step


def _reference_flux_step(v, x, sigmas, i, eta, prev_sample):
    """DanceGRPO flux_step (sde_solver=True, grpo=True), float64 torch."""
    import torch

    sigma = sigmas[i]
    dsigma = sigmas[i + 1] - sigma
    mean = x + dsigma * v
    x0 = x - sigma * v
    delta_t = sigma - sigmas[i + 1]
    std = eta * math.sqrt(delta_t)
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = mean + (-0.5 * eta**2 * score) * dsigma
    logp = (-((prev_sample - mean) ** 2) / (2 * std**2) - math.log(std)
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=torch.float64))))
    return mean, logp.mean(dim=tuple(range(1, logp.ndim)))


def test_sigmas_are_shifted_linspace():
    s = rollout_sigmas(8, 3.0)
    lin = np.linspace(1, 0, 9)
    np.testing.assert_allclose(s, 3 * lin / (1 + 2 * lin), rtol=1e-6)
    assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)
    np.testing.assert_allclose(shift_sigmas(lin, 1.0), lin)
    with pytest.raises(ValueError):
        rollout_sigmas(0)


@pytest.mark.parity
@pytest.mark.parametrize("i", [0, 3, 6])
def test_sde_step_matches_dancegrpo(i):
    import torch

    rng = np.random.default_rng(i)
    sig = rollout_sigmas(8, 3.0).astype(np.float64)
    v, x, xn = (rng.normal(size=(3, 16, 12)) for _ in range(3))
    mean_ref, logp_ref = _reference_flux_step(torch.tensor(v), torch.tensor(x), torch.tensor(sig), i, 0.3,
                                              torch.tensor(xn))
    out = sde_step(jnp.asarray(v), jnp.asarray(x), sig[i], sig[i + 1], 0.3, x_next=jnp.asarray(xn))
    np.testing.assert_allclose(np.asarray(out.mean), mean_ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logp), logp_ref.numpy(), rtol=1e-5, atol=1e-5)
    assert out.logp.dtype == jnp.float32


def test_sampling_and_scoring_agree():
    """Sampling with noise n and re-scoring the sample give the same log-prob (same function)."""
    key = jax.random.key(0)
    v, x, n = (jax.random.normal(jax.random.fold_in(key, k), (4, 8, 6)) for k in range(3))
    a = sde_step(v, x, 0.8, 0.6, 0.3, noise=n)
    b = sde_step(v, x, 0.8, 0.6, 0.3, x_next=a.x_next)
    np.testing.assert_array_equal(np.asarray(a.logp), np.asarray(b.logp))
    # log N(mean + std*n; mean, std^2) averaged over dims
    expect = np.mean(-0.5 * np.asarray(n) ** 2, axis=(1, 2)) - np.log(float(a.std)) - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(np.asarray(a.logp), expect, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        sde_step(v, x, 0.8, 0.6, 0.3)
    with pytest.raises(ValueError, match="unknown SDE"):
        sde_step(v, x, 0.8, 0.6, 0.3, noise=n, kind="bogus")


def test_rollout_records_what_the_loss_rescores():
    """Each stored transition re-scored with `step_log_prob` reproduces the rollout's logp exactly."""
    w = jax.random.normal(jax.random.key(1), (6, 6)) * 0.3
    vel = lambda x, t: jnp.tanh(x @ w) * (1.0 + t[:, None, None])  # noqa: E731
    sig = jnp.asarray(rollout_sigmas(6, 3.0))
    x_init = jax.random.normal(jax.random.key(2), (4, 5, 6))
    traj = jax.jit(lambda x, k: sde_rollout(vel, x, sig, 0.3, k))(x_init, jax.random.key(3))
    assert traj.latents.shape == (7, 4, 5, 6) and traj.log_probs.shape == (6, 4)
    score = jax.jit(lambda x, xn, j: step_log_prob(vel, x, xn, sig[j], sig[j + 1], 0.3).logp)
    for j in range(6):
        np.testing.assert_array_equal(np.asarray(score(traj.latents[j], traj.latents[j + 1], j)),
                                      np.asarray(traj.log_probs[j]))


def test_gaussian_kl_closed_form():
    a = jnp.ones((2, 3, 4))
    b = jnp.zeros((2, 3, 4))
    np.testing.assert_allclose(np.asarray(gaussian_kl(a, b, jnp.float32(0.5))), [2.0, 2.0])


def test_k1_loss_has_no_restoring_gradient_but_gaussian_kl_does():
    """Why the demo uses kl_type="gaussian" (README, design notes): on samples from the current
    policy, d/dtheta of the k1 term logp_theta(x) - logp_ref(x) averages to zero, while the
    closed-form KL pulls the transition mean back toward the reference's."""
    from arr_jax.rpo.loss import kl_k1

    n, d = 4096, 16
    x = jnp.zeros((n, d))
    sigma, sigma_next, eta = jnp.float32(0.9), jnp.float32(0.75), 0.7
    v_ref = jnp.zeros((n, d))
    shift = 0.3  # the policy's velocity = the reference's + shift

    def sample_next(key):
        noise = jax.random.normal(key, (n, d))
        return sde_step(v_ref + shift, x, sigma, sigma_next, eta, noise=noise).x_next

    x_next = sample_next(jax.random.key(0))
    ref = sde_step(v_ref, x, sigma, sigma_next, eta, x_next=x_next)

    def k1(s):
        out = sde_step(v_ref + s, x, sigma, sigma_next, eta, x_next=x_next)
        return jnp.mean(kl_k1(out.logp, ref.logp))

    def closed(s):
        out = sde_step(v_ref + s, x, sigma, sigma_next, eta, x_next=x_next)
        return jnp.mean(gaussian_kl(out.mean, ref.mean, out.std))

    g_k1, g_closed = jax.grad(k1)(shift), jax.grad(closed)(shift)
    # The k1 gradient is Monte-Carlo noise around 0 (here 0.002 against 0.097 for the closed form).
    assert abs(float(g_k1)) < 0.1 * float(g_closed)
    assert float(g_closed) > 0  # descending it moves the shift back toward 0
    # Both estimate the same KL value.
    np.testing.assert_allclose(float(k1(shift)), float(closed(shift)), rtol=0.1)


# --- every option of the SDE, the KL and the timestep at the edges (issue #19, kind 1) -----------------

def _reference_flow_grpo_step(v, x, sigmas, i, eta, prev_sample):
    """Flow-GRPO's ``sd3_sde_with_logprob`` restated in float64 numpy: at sigma == 1 the denominator's
    sigma becomes ``sigmas[1]``; returns (mean, std, logp (B,))."""
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    dt = sigma_next - sigma
    std_dev_t = eta * math.sqrt(sigma / (1 - (float(sigmas[1]) if sigma == 1 else sigma)))
    mean = x * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * math.sqrt(-dt)
    logp = -((prev_sample - mean) ** 2) / (2 * std ** 2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return mean, std, logp.mean(axis=tuple(range(1, logp.ndim)))


def _edge_cases():
    """(schedule, step) pairs: first step at sigma = 1, a middle one, the last step (to sigma = 0), T = 2, T = 1."""
    s8, s2, s1 = rollout_sigmas(8, 3.0), rollout_sigmas(2, 3.0), rollout_sigmas(1, 3.0)
    return [(s8, 0), (s8, 4), (s8, 7), (s2, 0), (s2, 1), (s1, 0)]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_flow_grpo_step_matches_reference_at_edges(case, eta):
    sig, i = _edge_cases()[case]
    rng = np.random.default_rng(case)
    v, x, xn = (rng.normal(size=(3, 8, 6)) for _ in range(3))
    mean_ref, std_ref, logp_ref = _reference_flow_grpo_step(v, x, sig.astype(np.float64), i, eta, xn)
    out = sde_step(jnp.asarray(v), jnp.asarray(x), sig[i], sig[i + 1], eta, x_next=jnp.asarray(xn), kind="flow_grpo")
    np.testing.assert_allclose(float(out.std), std_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.mean), mean_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logp), logp_ref, rtol=1e-5, atol=1e-5)
    if i == 0:  # b01: at sigma = 1 with eta 0.7 on the 8-step schedule the std is 0.70, not 4.72
        assert sig[0] == 1.0 and np.isfinite(float(out.std))
        if eta == 0.7 and len(sig) == 9:
            np.testing.assert_allclose(float(out.std), 0.70, atol=0.005)


@pytest.mark.parity
@pytest.mark.parametrize("case", range(6))
def test_dance_step_matches_reference_at_edges(case):
    import torch

    sig, i = _edge_cases()[case]
    rng = np.random.default_rng(10 + case)
    v, x, xn = (rng.normal(size=(3, 8, 6)) for _ in range(3))
    mean_ref, logp_ref = _reference_flux_step(torch.tensor(v), torch.tensor(x), torch.tensor(sig.astype(np.float64)),
                                              i, 0.3, torch.tensor(xn))
    out = sde_step(jnp.asarray(v), jnp.asarray(x), sig[i], sig[i + 1], 0.3, x_next=jnp.asarray(xn), kind="dance")
    np.testing.assert_allclose(float(out.std), 0.3 * math.sqrt(float(sig[i]) - float(sig[i + 1])), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.mean), mean_ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logp), logp_ref.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dance", "flow_grpo"])
def test_rollout_first_and_last_steps_follow_the_step_formula(kind):
    """The rollout (what RPO samples with) applies `sde_step` with the schedule's own (sigma, sigma_next)
    at every step, the first (sigma = 1) and the last (to 0) included, on T = 2."""
    sig = rollout_sigmas(2, 3.0)
    x0 = jax.random.normal(jax.random.key(0), (2, 4, 3))
    key = jax.random.key(5)
    vel = lambda x, t: 0.5 * x + t[:, None, None]  # noqa: E731
    traj = sde_rollout(vel, x0, jnp.asarray(sig), 0.7, key, kind=kind)
    x = x0
    for i in range(2):
        t = jnp.full((2,), jnp.floor(jnp.float32(sig[i]) * 1000) / 1000)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        out = sde_step(vel(x, t), x, sig[i], sig[i + 1], 0.7, noise=noise, kind=kind)
        np.testing.assert_allclose(np.asarray(traj.latents[i + 1]), np.asarray(out.x_next), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(traj.log_probs[i]), np.asarray(out.logp), rtol=1e-6, atol=1e-6)
        x = out.x_next
    assert np.all(np.isfinite(np.asarray(traj.latents)))


@pytest.mark.parametrize("quantize", [True, False])
def test_model_timestep_matches_release_at_edges(quantize):
    """The release feeds ``int(sigma * 1000) / 1000`` computed on float32 sigmas (torch); unquantised is sigma."""
    import torch

    from arr_jax.diffusion.schedule import model_timestep

    sig = np.concatenate([rollout_sigmas(8, 3.0)[:-1], rollout_sigmas(2, 3.0)[:-1], np.float32([0.3, 0.001])])
    got = np.asarray(jax.vmap(lambda s: model_timestep(s, quantize))(jnp.asarray(sig)))
    if quantize:
        ref = np.array([int(torch.tensor(float(s), dtype=torch.float32) * 1000) / 1000 for s in sig], np.float32)
    else:
        ref = sig
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)
    assert got[0] == 1.0  # sigma = 1 stays 1


@pytest.mark.parametrize("kind", ["dance", "flow_grpo"])
@pytest.mark.parametrize("case", [0, 2, 3, 4])
def test_kl_types_match_their_formulas_at_edges(kind, case):
    """k1 (the release): logp_theta - logp_ref on the stored transition; gaussian (Flow-GRPO's train
    loop): mean over dims of (mean_theta - mean_ref)^2 / (2 std^2) with std the transition std."""
    from arr_jax.rpo.loss import kl_k1

    sig, i = _edge_cases()[case]
    rng = np.random.default_rng(case)
    v, v_ref, x, xn = (rng.normal(size=(3, 8, 6)) for _ in range(4))
    new = sde_step(jnp.asarray(v), jnp.asarray(x), sig[i], sig[i + 1], 0.7, x_next=jnp.asarray(xn), kind=kind)
    ref = sde_step(jnp.asarray(v_ref), jnp.asarray(x), sig[i], sig[i + 1], 0.7, x_next=jnp.asarray(xn), kind=kind)
    ref_fn = _reference_flow_grpo_step if kind == "flow_grpo" else None
    if ref_fn is not None:
        m_new, s_new, l_new = ref_fn(v, x, sig.astype(np.float64), i, 0.7, xn)
        m_ref, _, l_ref = ref_fn(v_ref, x, sig.astype(np.float64), i, 0.7, xn)
    else:
        s_new = 0.7 * math.sqrt(float(sig[i]) - float(sig[i + 1]))
        m_new, m_ref = (np.asarray(o.mean, np.float64) for o in (new, ref))
        l_new, l_ref = (np.asarray(o.logp, np.float64) for o in (new, ref))
    np.testing.assert_allclose(np.asarray(kl_k1(new.logp, ref.logp)), l_new - l_ref, rtol=1e-4, atol=1e-4)
    want = ((m_new - m_ref) ** 2).mean(axis=(1, 2)) / (2 * s_new ** 2)
    np.testing.assert_allclose(np.asarray(gaussian_kl(new.mean, ref.mean, new.std)), want, rtol=1e-4, atol=1e-5)
