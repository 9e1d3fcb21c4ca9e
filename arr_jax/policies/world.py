"""The ``world`` policy kind: the demo's tiny pixel-space Flux + the world text encoder.

Built from a config with ``model``, ``world``, ``base_checkpoint``, ``pretrain`` and ``rpo``
sections (`configs/demo.py`). ``base_checkpoint = ""`` is the base policy shipped inside the
installed package (found with ``importlib.resources``, wherever the command runs from); a path
names another one, e.g. one written by ``python -m arr_jax.pretrain``.
"""
from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

from flax import nnx

from arr_jax.policies.base import Policy

SHIPPED = ("arr_jax.world", "assets/base_policy.safetensors")


def shipped_base_checkpoint() -> Path:
    """The committed base policy inside the installed package."""
    pkg, rel = SHIPPED
    return Path(str(importlib.resources.files(pkg).joinpath(rel)))


def resolve_base_checkpoint(cfg) -> Path:
    """The base checkpoint of ``cfg``: the shipped one for "", else the given path.

    A missing path is pretrained first only when ``pretrain.auto`` is set (the ``tiny``
    variants); otherwise it is a `FileNotFoundError` that says how to make one.
    """
    if not cfg.base_checkpoint:
        path = shipped_base_checkpoint()
        if not path.exists():
            raise FileNotFoundError(f"the shipped base policy {path} is missing from the installed package; "
                                    "reinstall arr_jax or pass --config.base_checkpoint")
        return path
    path = Path(cfg.base_checkpoint)
    if path.exists():
        return path
    if cfg.pretrain.get("auto", False):
        from arr_jax.pretrain import run as pretrain

        print(f"base policy {path} not found and pretrain.auto is set: pretraining it "
              f"({cfg.pretrain.steps} steps, writing {path})")
        pretrain(cfg)
        return path
    raise FileNotFoundError(f"no base policy checkpoint at {path}: make one with `python -m arr_jax.pretrain "
                            f"--config.base_checkpoint={path}`, or drop --config.base_checkpoint to use the "
                            "shipped one")


def build(cfg, rules=None) -> Policy:
    """The world policy of ``cfg`` with LoRA adapters (or full fine-tuning, ``rpo.full_finetune``)."""
    from arr_jax.nn.lora import LoRAConfig
    from arr_jax.world.policy import PixelSpace, PromptEncoder, WorldPolicy, load_base

    del rules  # placed by the trainer
    r = cfg.rpo
    lora = None if r.full_finetune else LoRAConfig(rank=r.lora_rank, alpha=r.lora_alpha,
                                                      targets=tuple(r.lora_targets))
    base_path = resolve_base_checkpoint(cfg)
    net = WorldPolicy(cfg.model, rngs=nnx.Rngs(cfg.seed + 1), lora=lora)
    info = load_base(net, base_path)
    px = PixelSpace(cfg.world.image_size, cfg.model.patch_size, cfg.model.max_tokens)
    encoder = PromptEncoder(net.text, cfg.model.max_tokens)

    def decode_fn(params, x0):
        del params  # pixel space: nothing to decode with
        return px.decode(x0)

    def export_lora(model, path, metadata):
        from arr_jax.convert.lora_peft import save_peft_lora

        return save_peft_lora(model, path, prefix="transformer", metadata=metadata)

    def precompute(items) -> None:
        """Before iteration 0: every prompt must be a caption of the world's grammar (known words, at
        most ``model.max_tokens`` of them); one ValueError naming the first bad prompt's file:line."""
        from arr_jax.world import spec

        for it in items:
            try:
                spec.tokenize([it.text], cfg.model.max_tokens)
            except ValueError as e:
                raise ValueError(f"prompt {it.origin or repr(it.text[:60])}: {e}; the world policy reads only "
                                 "captions of its grammar (arr_jax.world.spec)") from None

    digest = hashlib.sha256(base_path.read_bytes()).hexdigest()
    return Policy(kind="world", model=net.flux, apply_fn=px.apply, precompute=precompute,
                  encode_fn=lambda items: encoder([it.text for it in items]), decode_fn=decode_fn,
                  decode_params=None, latent_shape=px.latent_shape,
                  export_lora=None if r.full_finetune else export_lora,
                  identity={"kind": "world", "model": cfg.model.to_dict(), "image_size": cfg.world.image_size,
                            "base_sha256": digest},
                  info={"base_checkpoint": str(base_path),
                        **{k: info.get(k) for k in ("seed", "steps", "final_loss")}})
