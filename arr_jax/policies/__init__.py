"""Policy kinds: each turns a config into an `arr_jax.policies.base.Policy` for the trainer.

    world            the CPU demo's tiny pixel-space Flux (`arr_jax.policies.world`)
    flux             FLUX.1-dev text-to-image from a diffusers snapshot (`arr_jax.policies.flux`)
    flux_kontext     FLUX.1-Kontext editing (`arr_jax.policies.flux`)
    qwen_image_edit  Qwen-Image-Edit(-2509) editing (`arr_jax.policies.qwen_image_edit`)
"""
from __future__ import annotations

import importlib

from arr_jax.policies.base import Policy, PromptItem, as_items

KINDS = {"world": "arr_jax.policies.world", "flux": "arr_jax.policies.flux",
         "flux_kontext": "arr_jax.policies.flux", "qwen_image_edit": "arr_jax.policies.qwen_image_edit"}


def build_policy(cfg, rules=None) -> Policy:
    """The policy of ``cfg.kind`` (a `ValueError` naming the key for an unknown kind)."""
    kind = cfg.get("kind", "")
    if kind not in KINDS:
        raise ValueError(f"bad config value kind: {kind!r} (expected one of {sorted(KINDS)})")
    return importlib.import_module(KINDS[kind]).build(cfg, rules)


__all__ = ["KINDS", "Policy", "PromptItem", "as_items", "build_policy"]
