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
