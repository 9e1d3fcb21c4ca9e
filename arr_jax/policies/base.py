"""What a policy kind hands the RPO trainer: the `Policy` record and the `PromptItem` it is fed.

Every kind (``world``, ``flux``, ``flux_kontext``, ``qwen_image_edit``) builds one `Policy`
from a config (`arr_jax.policies.build_policy`). `arr_jax.rpo.trainer.RPOTrainer` knows no
kind: it sees only these fields.

Pure functions (traced under ``jax.jit``; no Python side effects, no closed-over weights):

* ``apply_fn(model, x, t, cond) -> v``: velocity (B, *latent_shape) float32 of latents ``x``
  (B, *latent_shape) at sigma ``t`` (B,) float32, ``cond`` a pytree of (B, ...) arrays.
* ``decode_fn(decode_params, x0) -> images``: uint8 (B, H, W, 3) of the final ``x0_hat``
  (B, *latent_shape). The decoder's weights (e.g. the VAE) are the *argument*
  ``decode_params``, never constants closed over, so a 160 MB VAE is not baked into the
  compiled program and its sharding is the caller's.

Host function:

* ``encode_fn(items) -> cond``: a pytree of (B, ...) arrays for ``B`` `PromptItem` s (text
  embeddings, cached; editing sources VAE-encoded). Called once per rollout batch.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One training or evaluation prompt.

    text:     the prompt (or the edit instruction).
    source:   editing only: the source image, uint8 (H, W, 3); the judge sees it as Image BASE.
    category: optional label for per-category metrics (GenEval tag, edit type, ...).
    origin:   where it came from, for error messages and reports (``file:line``).
    """

    text: str
    source: np.ndarray | None = None
    category: str | None = None
    origin: str = ""

    @classmethod
    def of(cls, x: "PromptItem | str") -> "PromptItem":
        return x if isinstance(x, PromptItem) else cls(str(x))


def as_items(prompts: Sequence["PromptItem | str"]) -> list[PromptItem]:
    """Strings become text-only items; items pass through."""
    return [PromptItem.of(p) for p in prompts]


@dataclasses.dataclass
class Policy:
    """A policy kind, as the trainer sees it (see the module docstring for the functions).

    model:         the trained network (an nnx Module; LoRA adapters inside for LoRA training).
    latent_shape:  one sample's latent shape, e.g. (N, 64) packed FLUX latents.
    export_lora:   ``export_lora(model, path, metadata)`` writes the adapters in the diffusers /
                   PEFT layout of this kind (None: the kind cannot export).
    identity:      JSON-able facts that fix the network (snapshot path, config): checked on
                   resume and written into checkpoint and LoRA metadata.
    is_editing:    prompts carry source images; the judge sees them as Image BASE.
    precompute:    optional ``precompute(items)``: encode (and cache) every prompt of the run up
                   front, freeing encoders that are no longer needed.
    """

    kind: str
    model: nnx.Module
    apply_fn: Callable[[nnx.Module, Any, Any, Any], Any]
    encode_fn: Callable[[Sequence[PromptItem]], Any]
    decode_fn: Callable[[Any, Any], Any]
    decode_params: Any
    latent_shape: tuple[int, ...]
    export_lora: Callable[[nnx.Module, str | Path, dict], None] | None = None
    identity: dict = dataclasses.field(default_factory=dict)
    is_editing: bool = False
    precompute: Callable[[Sequence[PromptItem]], None] | None = None
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AbstractPolicy:
    """A policy's shapes, dtypes and shardings without its weights, for ahead-of-time compilation
    (`arr_jax.preflight` compiles the trainer's programs over it for a TPU topology on a CPU machine).

    policy: a `Policy` whose ``model`` and ``decode_params`` hold ``jax.ShapeDtypeStruct`` leaves, each
            with the sharding the trainer gives that weight (`place_abstract`); ``encode_fn`` is not
            callable (there are no text encoders).
    cond:   one sample's conditioning as ``encode_fn`` makes it: a pytree of ``jax.ShapeDtypeStruct``
            without the batch axis (e.g. FLUX ``txt (512, 4096) bf16``).
    source: where the shapes come from (a snapshot's config files, or the published configs).
    plan_configs: the model configs as keyword arguments of the family's ``abstract_models`` in the
            analytic memory plan (`arr_jax.memory`), so the plan is computed for the same models.
    """

    policy: Policy
    cond: Any
    source: str = ""
    plan_configs: dict = dataclasses.field(default_factory=dict)


def abstract_state(state: Any, rules=None) -> Any:
    """An nnx ``State`` (of arrays or ``jax.ShapeDtypeStruct``) as ``jax.ShapeDtypeStruct`` leaves, each
    with the sharding `arr_jax.sharding.param_shardings` gives it under ``rules`` (none without a mesh)."""
    import jax

    def sds(x, sh=None):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sh)

    if rules is None or rules.mesh is None:
        return jax.tree.map(sds, state)
    from arr_jax.sharding import param_shardings

    def place(sh, var):
        return var.replace(sds(var.get_value() if hasattr(var, "get_value") else var.value, sh))

    return jax.tree.map(place, param_shardings(state, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place_abstract(module: nnx.Module, rules=None) -> nnx.Module:
    """``module`` (built or from ``nnx.eval_shape``) as a module of ``jax.ShapeDtypeStruct`` weights
    placed by ``rules`` (`abstract_state`)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, abstract_state(state, rules))


def abstract_of(policy: Policy, cond: Any, rules=None, source: str = "") -> AbstractPolicy:
    """An `AbstractPolicy` from a built (small) policy: its weights' shapes placed by ``rules``, and
    ``cond`` the conditioning of a batch as ``encode_fn`` returned it (the batch axis is dropped)."""
    import jax

    model = place_abstract(policy.model, rules)
    params = abstract_state(policy.decode_params, rules)
    one = jax.tree.map(lambda c: jax.ShapeDtypeStruct(tuple(c.shape[1:]), c.dtype), cond)
    return AbstractPolicy(dataclasses.replace(policy, model=model, decode_params=params), one, source)
