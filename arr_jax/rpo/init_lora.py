"""``rpo.init_lora``: start RPO from a diffusers / PEFT LoRA file instead of fresh adapters.

The file is one `arr_jax.convert.lora_peft` reads: our own export (``<workdir>/lora/*.safetensors``)
or a third party's in the diffusers / PEFT layout (``<module>.lora_A.weight`` / ``.lora_B.weight``,
alpha baked, in the ``lora_adapter_metadata`` header or as ``<module>.alpha`` keys). It must adapt
exactly the modules the run's ``rpo.lora_targets`` adapt, at ``rpo.lora_rank``; its alpha may differ
(B is rescaled to the run's ``rpo.lora_alpha``, so the model computes what the file computes).
Anything else is refused before a weight changes, with one line naming the mismatch and the key to set.

The reference policy (the KL anchor and the held-out evaluation's baseline) is, by
``rpo.init_lora_reference``: ``"init"`` (default) the initial LoRA, as full fine-tuning anchors on its
initial weights, so the held-out win rate measures what RPO added to the file; ``"base"`` the base
model (LoRA off), as without ``init_lora``. A resumed run restores adapters, optimiser and reference
from its checkpoint, never from the file (`arr_jax.rpo.trainer.RPOTrainer.state_dict`).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

REFERENCES = ("init", "base")


def _target(name: str) -> str:
    """The block-free part of a module name: ``transformer_blocks.3.attn.to_q`` -> ``attn.to_q``."""
    return re.sub(r"^(?:.*?\.\d+\.)", "", name)


def _listed(names, n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_init_lora(path: str | Path, rpo) -> dict:
    """The modules of LoRA file ``path`` (`arr_jax.convert.lora_peft`'s reading), checked against what needs no
    model: the file exists, the run trains LoRA, and the rank is ``rpo.lora_rank``. `build_run` calls it before
    loading the policy, so a wrong file fails in seconds. Errors as `check_init_lora`."""
    from arr_jax.convert.lora_peft import _modules, _read

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"bad config value rpo.init_lora: {path} does not exist; pass a diffusers / PEFT "
                                "LoRA .safetensors file (e.g. a run's <workdir>/lora/final.safetensors)")
    if rpo.get("full_finetune", False):
        raise ValueError(f"bad config value rpo.init_lora: {path} is a LoRA but rpo.full_finetune=True trains all "
                         "weights; pass --config.rpo.full_finetune=False or --config.rpo.init_lora=''")
    mods = _modules(*_read(p), path=p)
    ranks = {int(m["A"].shape[0]) for m in mods.values()}
    want = int(rpo.lora_rank)
    if ranks != {want}:
        raise ValueError(f"bad config value rpo.init_lora: {path} has LoRA rank {_listed(map(str, ranks))} but "
                         f"rpo.lora_rank={want}; pass --config.rpo.lora_rank={min(ranks)} to start from it")
    return mods


def check_init_lora(model, path: str | Path, rpo) -> dict:
    """Check the LoRA file ``path`` against ``model``'s adapters (built from the ``rpo`` config section);
    returns what the run records: ``{"path", "sha256", "rank", "alpha", "modules"}``.

    Raises FileNotFoundError when ``path`` is missing, ValueError (one line, naming the file, the mismatch
    and the config key) when the run trains no LoRA (``rpo.full_finetune``), when the file's rank is not
    ``rpo.lora_rank`` or its modules are not exactly the model's adapted ones (``rpo.lora_targets``), and
    the errors of `arr_jax.convert.lora_peft` (another layout, mixed ranks, DoRA or other PEFT options).
    """
    from arr_jax.convert.lora_peft import adapted_linears

    p, mods = Path(path), read_init_lora(path, rpo)
    ours = adapted_linears(model)
    if not ours:
        raise ValueError(f"bad config value rpo.init_lora: the model has no LoRA adapters to load {path} into "
                         "(rpo.lora_targets matches no module)")
    want = int(rpo.lora_rank)
    extra, missing = sorted(set(mods) - set(ours)), sorted(set(ours) - set(mods))
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"adapts modules the run does not (targets {_listed({_target(n) for n in extra})}; "
                         f"e.g. {extra[0]})")
        if missing:
            parts.append(f"lacks modules the run adapts (targets {_listed({_target(n) for n in missing})}; "
                         f"e.g. {missing[0]})")
        file_targets = sorted({_target(n) for n in mods})
        raise ValueError(f"bad config value rpo.init_lora: {path} {' and '.join(parts)}: rpo.lora_targets="
                         f"{tuple(rpo.lora_targets)}; set --config.rpo.lora_targets to the file's targets "
                         f"{tuple(file_targets)} (or use a LoRA trained on the run's targets)")
    alphas = sorted({float(m["scale"]) * want for m in mods.values()})  # the file's own alpha (ours may differ)
    return {"path": str(p), "sha256": file_sha256(p), "rank": want, "alpha": alphas[0] if len(alphas) == 1 else alphas,
            "modules": len(mods)}


def load_init_lora(model, path: str | Path, rpo) -> dict:
    """`check_init_lora`, then fill ``model``'s adapters from the file in place (`load_peft_lora`: per-block
    and stacked block layouts alike, B rescaled from the file's alpha/r to the model's). Returns the
    record of `check_init_lora`."""
    from arr_jax.convert.lora_peft import load_peft_lora

    info = check_init_lora(model, path, rpo)
    load_peft_lora(model, path, strict=True)
    return info
