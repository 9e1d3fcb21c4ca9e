"""arr_jax.perf: FLOP counts (scan-aware), XLA cost analysis on both return shapes, AOT compile, MFU."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arr_jax import perf

M, K, N, T = 8, 16, 12, 5


def _scan(x, w):
    def body(c, _):
        return jnp.tanh(c @ w), None
    return jax.lax.scan(body, x, None, length=T)[0]


def test_scan_bodies_count_length_times_where_xla_counts_once():
    x, w = jnp.ones((M, K)), jnp.ones((K, K))
    cost = perf.program_cost(jax.jit(_scan), x, w)
    assert cost.flops == 2 * M * K * K * T
    assert cost.unknown_loops == 0
    assert cost.compile_s > 0 and cost.lower_s > 0
    # XLA's own count is of the loop body once (the reason for the jaxpr count); allow small extras
    assert cost.xla_flops < 2 * M * K * K * 2


def test_gradient_of_a_matmul_is_three_matmuls():
    x, w = jnp.ones((M, K)), jnp.ones((K, N))
    fwd, _ = perf.jaxpr_flops(lambda x, w: jnp.sum(x @ w), x, w)
    both, _ = perf.jaxpr_flops(jax.grad(lambda w, x: jnp.sum((x @ w) ** 2), argnums=(0, 1)), w, x)
    only_w, _ = perf.jaxpr_flops(jax.grad(lambda w, x: jnp.sum((x @ w) ** 2)), w, x)
    assert fwd == 2 * M * K * N
    assert both == 3 * fwd  # forward, d/dx and d/dw
    assert only_w == 2 * fwd  # no d/dx (as for frozen weights under LoRA, the other way round)


def test_batched_dot_and_convolution_counts():
    q, k = jnp.ones((2, 3, 7, 4)), jnp.ones((2, 3, 9, 4))
    f, _ = perf.jaxpr_flops(lambda q, k: jnp.einsum("bhsd,bhtd->bhst", q, k), q, k)
    assert f == 2 * 2 * 3 * 7 * 9 * 4
    x, kern = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    f, _ = perf.jaxpr_flops(conv, x, kern)
    assert f == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)


def test_cond_counts_costliest_branch_and_while_is_flagged():
    x, w = jnp.ones((M, K)), jnp.ones((K, K))

    def f(p, x, w):
        return jax.lax.cond(p, lambda: (x @ w) @ w, lambda: x)

    flops, unknown = perf.jaxpr_flops(f, True, x, w)
    assert flops == 2 * 2 * M * K * K and unknown == 0

    def g(x, w):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0]

    flops, unknown = perf.jaxpr_flops(g, x, w)
    assert flops == 2 * M * K * K and unknown == 1


class _FakeCompiled:
    def __init__(self, ca):
        self.ca = ca

    def cost_analysis(self):
        return self.ca


def test_xla_cost_accepts_dict_list_and_nothing():
    assert perf.xla_cost(_FakeCompiled({"flops": 3.0, "bytes accessed": 5})) == {"flops": 3.0, "bytes accessed": 5.0}
    merged = perf.xla_cost(_FakeCompiled([{"flops": 3.0}, {"flops": 4.0, "x": "not a number"}]))
    assert merged == {"flops": 7.0}
    assert perf.xla_cost(_FakeCompiled(None)) == {}


def test_instrumented_compiles_once_per_signature_and_keeps_donation():
    x, w = jnp.ones((M, K)), jnp.ones((K, K))
    ins = perf.Instrumented(jax.jit(_scan, donate_argnums=0), "scan")
    y = ins(x, w)
    y = ins(y, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_scan(_scan(jnp.ones((M, K)), w), w)), rtol=1e-6)
    assert ins.calls == 2 and len(ins.costs) == 1 and ins.compile_s > 0
    assert ins.flops_run == 2 * ins.last.flops == 2 * (2 * M * K * K * T)
    ins(jnp.ones((2 * M, K)), w)  # a new shape: a second program
    assert len(ins.costs) == 2 and ins.last.flops == 2 * (2 * M) * K * K * T
    with pytest.raises(TypeError, match="jit"):
        perf.Instrumented(_scan)


def test_chips_and_mfu():
    assert perf.chip_spec("NVIDIA H200").peak_bf16_flops == 989e12
    assert perf.chip_spec("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
    assert perf.chip_spec("TPU v6 lite").name == "TPU v6e"
    assert perf.chip_spec("TPU v5").name == "TPU v5p" and perf.chip_spec("TPU v5 lite").name == "TPU v5e"
    assert perf.chip_spec("Some CPU") is None
    assert perf.chip_spec(jax.devices()[0]) is None  # the tests run on CPU: no peak
    assert perf.mfu(1e12, 1.0) is None
    assert math.isclose(perf.mfu(989e12 / 2, 1.0, "NVIDIA H200"), 0.5)
    assert math.isclose(perf.mfu(989e12, 1.0, "NVIDIA H200", num_devices=4), 0.25)
    assert math.isclose(perf.mfu(1.0, 2.0, peak_flops=1.0), 0.5)
    out = perf.achieved(perf.ProgramCost(flops=2e12, bytes_accessed=4e9), 2.0, "NVIDIA H200", calls=3)
    assert math.isclose(out["tflop_s"], 3.0) and math.isclose(out["gb_s"], 6.0)
    assert math.isclose(out["mfu"], 3e12 / 989e12)
