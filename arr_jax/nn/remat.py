"""Rematerialisation modes shared by the diffusion transformers (FLUX, Qwen-Image).

A model config's ``remat`` is a bool (False = "none", True = "full") or one of `REMAT_MODES`:

  "none"  keep every activation for the backward pass (fastest, most memory);
  "full"  save only each block's inputs and recompute the block in the backward pass;
  "dots"  save the outputs of matmuls without batch dimensions (Linear layers), recompute the rest
          (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).
"""
from __future__ import annotations

from typing import Callable

import jax

REMAT_MODES = ("none", "full", "dots")


def remat_policy(remat: bool | str):
    """The ``jax.checkpoint`` policy of a ``remat`` value: None (no remat), "full" (save nothing but the
    block inputs), a checkpoint policy ("dots"), or "?" if ``remat`` is not a known mode."""
    mode = {False: "none", True: "full"}.get(remat, remat) if isinstance(remat, bool) else remat
    if mode == "none":
        return None
    if mode == "full":
        return "full"
    if mode == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return "?"


def check_remat(remat, owner: str) -> None:
    """Raise ``ValueError`` naming ``owner`` (e.g. "FluxConfig.remat") if ``remat`` is not a known mode."""
    if not isinstance(remat, (bool, str)) or remat_policy(remat) == "?":
        raise ValueError(f"{owner} must be a bool or one of {REMAT_MODES}, got {remat!r}")


def checkpoint(fn: Callable, remat: bool | str) -> Callable:
    """``fn`` wrapped in ``jax.checkpoint`` per ``remat`` (unchanged for "none")."""
    policy = remat_policy(remat)
    if policy is None:
        return fn
    return jax.checkpoint(fn) if policy == "full" else jax.checkpoint(fn, policy=policy)
