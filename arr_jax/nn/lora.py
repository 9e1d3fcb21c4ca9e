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
from typing import Any

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


MATCH_MODES = ("suffix", "exact")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, scale alpha / r, and the Linear modules to adapt (``targets``, read per ``match``).

    ``match="suffix"`` (for targets written in a config): a target matches every module whose
    dotted path equals it or ends with ``"." + target`` (the rule of PEFT's
    ``LoraConfig(target_modules=[...])``), e.g. ``"attn.to_q"`` matches
    ``"transformer_blocks.0.attn.to_q"`` and ``"single_transformer_blocks.3.attn.to_q"``.

    ``match="exact"`` (for module names read from a LoRA file, see
    `arr_jax.convert.lora_peft.lora_config_from_file`): a target matches only the module with
    exactly that dotted path, e.g. ``"proj_out"`` is the top-level output projection and not
    ``"single_transformer_blocks.0.proj_out"``. This is how PEFT injects adapters from a state dict
    (``inject_adapter_in_model(..., state_dict=...)``, which diffusers' ``load_lora_weights``
    uses): every module the file names, and only those, is adapted.

    Raises ValueError for an unknown ``match`` or for ``targets`` given as one string.
    """

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    param_dtype: Any = jnp.float32  # adapters stay float32 even when the base weights are bf16
    match: str = "suffix"

    def __post_init__(self):
        if self.match not in MATCH_MODES:
            raise ValueError(f"LoRAConfig.match must be one of {MATCH_MODES}, got {self.match!r}")
        if isinstance(self.targets, str):
            raise ValueError(f"LoRAConfig.targets must be a sequence of module names, got the string "
                             f"{self.targets!r} (write ({self.targets!r},) for one target)")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, path: str) -> bool:
        """Whether the module at dotted ``path`` is a target under this config's ``match`` rule."""
        if self.match == "exact":
            return path in self.targets
        return any(path == t or path.endswith("." + t) for t in self.targets)


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
    """Attach adapters to every `Linear` whose dotted path matches ``config`` (see `LoRAConfig`).

    Returns the adapted paths (sorted). Raises ValueError if nothing matched (so a typo in a
    suffix target cannot silently train nothing) and, with ``match="exact"``, if any target is not
    the path of a Linear of the model (the error lists them).
    """
    linears = {_dotted(path): m for path, m in nnx.iter_modules(model) if isinstance(m, Linear)}
    if config.match == "exact":
        missing = [t for t in config.targets if t not in linears]
        if missing:
            raise ValueError(f"LoRA targets (exact module names) that are no Linear layer of the model: "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} of "
                             f"{len(config.targets)}); the model's Linear layers are e.g. {sorted(linears)[:4]}")
    hits = sorted(((name, m) for name, m in linears.items() if config.matches(name)), key=lambda h: h[0])
    if not hits:
        raise ValueError(f"LoRA targets {config.targets} matched no Linear layer")
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
