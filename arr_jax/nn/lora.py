"""Low-rank adapters on `arr_jax.nn.layers.Linear`, as a separate variable type.

A targeted Linear gets ``lora_a`` (in, rank; PEFT's kaiming-uniform init) and ``lora_b``
(rank, out; zeros) and computes ``x @ W + b + (alpha / rank) * (x @ A) @ B``.

Both adapters are `LoRAParam`, a subclass of ``nnx.Param``. So:
  * the optimizer trains only the adapters with ``nnx.Optimizer(model, tx, wrt=LoRAParam)``;
  * `split_lora` separates ``(graphdef, lora_state, base_state)``;
  * the frozen REFERENCE policy is the same graph with `lora_off` applied to the LoRA
    state: zero adapters give exactly the base output, so no second copy of the weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from arr_jax.nn.layers import Linear

DEFAULT_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


class LoRAParam(nnx.Param):
    """A trainable low-rank adapter matrix (``lora_a`` or ``lora_b``)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, scale alpha / r, and module-name suffixes to adapt.

    A target matches a module whose dotted path equals it or ends with ``"." + target``,
    e.g. ``"attn.to_q"`` matches ``"transformer_blocks.0.attn.to_q"`` and
    ``"single_transformer_blocks.3.attn.to_q"``.
    """

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    param_dtype: Any = jnp.float32  # adapters stay float32 even when the base weights are bf16

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _matches(path: str, targets: Iterable[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def add_lora(linear: Linear, rank: int, alpha: float, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
    """Attach adapters to one Linear in place (A ~ kaiming-uniform(a=sqrt(5)) like PEFT, B = 0)."""
    in_axis, out_axis = linear.kernel.get_metadata().get("axes", (None, None))
    # kaiming_uniform_(a=sqrt(5)) on torch's (rank, in) weight: bound = 1 / sqrt(in).
    bound = 1.0 / math.sqrt(linear.in_features)
    a = jax.random.uniform(rngs.params(), (linear.in_features, rank), dtype, -bound, bound)
    linear.lora_a = LoRAParam(a, axes=(in_axis, "lora_rank"))
    linear.lora_b = LoRAParam(jnp.zeros((rank, linear.out_features), dtype), axes=("lora_rank", out_axis))
    linear.lora_scale = alpha / rank


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Attach adapters to every `Linear` whose dotted path matches ``config.targets``.

    Returns the adapted paths (sorted). Errors if nothing matched, so a typo in a
    target cannot silently train nothing.
    """
    hits = []
    for path, module in nnx.iter_modules(model):
        name = _dotted(path)
        if isinstance(module, Linear) and _matches(name, config.targets):
            hits.append((name, module))
    if not hits:
        raise ValueError(f"LoRA targets {config.targets} matched no Linear layer")
    hits.sort(key=lambda h: h[0])
    for _, module in hits:
        add_lora(module, config.rank, config.alpha, rngs=rngs, dtype=config.param_dtype)
    return [n for n, _ in hits]


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, lora_state, base_state)``; ``nnx.merge(graphdef, lora_state, base_state)`` rebuilds it."""
    return nnx.split(model, LoRAParam, ...)


def lora_off(state: nnx.State) -> nnx.State:
    """The same state with every `LoRAParam` zeroed (other leaves untouched): the reference policy."""

    def zero(v):
        if isinstance(v, LoRAParam):
            return v.replace(jnp.zeros_like(v[...]))
        return v

    return jax.tree.map(zero, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def count_params(model_or_state: Any, variable_type: Any = nnx.Param) -> int:
    """Number of scalars in the variables of ``variable_type`` (e.g. ``LoRAParam``)."""
    state = model_or_state
    if isinstance(state, nnx.Module):
        state = nnx.state(state, variable_type)
    total = 0
    for leaf in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(leaf, nnx.Variable):
            if not isinstance(leaf, variable_type):
                continue
            leaf = leaf.get_value()
        total += math.prod(leaf.shape)
    return total
