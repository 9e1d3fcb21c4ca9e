"""LoRA adapters of a `FluxTransformer` <-> diffusers / PEFT safetensors files.

Our adapted Linear computes ``x W + (alpha/r) (x A) B`` with A (in, r), B (r, out). PEFT stores
``lora_A.weight`` = A^T (r, in) and ``lora_B.weight`` = B^T (out, r) under the diffusers module
name, prefixed ``transformer.`` (what ``FluxPipeline.load_lora_weights`` routes to the transformer)::

    transformer.transformer_blocks.0.attn.to_q.lora_A.weight    (r, in)
    transformer.transformer_blocks.0.attn.to_q.lora_B.weight    (out, r)

The scale alpha/r is carried in one of three ways (``alpha_format``), each giving diffusers/PEFT
the same output as our model:
  * ``"bake"`` (default): B is multiplied by alpha/r and no alpha is written, so every reader
    (PEFT's no-alpha convention: scale 1) computes the same product;
  * ``"metadata"``: B unscaled, ``lora_adapter_metadata`` JSON (r, lora_alpha, target_modules) in
    the safetensors header, as diffusers' ``save_lora_weights`` writes it;
  * ``"keys"``: B unscaled, a scalar ``<module>.alpha`` tensor per module (kohya style).
Import understands all three. With ``use_rslora`` true in the metadata the scale is alpha/sqrt(r)
(PEFT's rsLoRA), on import; export always writes ``use_rslora: false`` (our scale is alpha/r). Every other
field of PEFT's LoraConfig is either inert for a saved adapter or, when it changes the maths and is not at
its default (DoRA ``use_dora``, ``rank_pattern``, ``alpha_pattern``, ``lora_bias``, ``bias``,
``fan_in_fan_out``, ``modules_to_save``, a PiSSA/OLoRA/LoftQ init, ...), refused by name (ValueError).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from arr_jax.nn.layers import Linear
from arr_jax.nn.lora import LoRAConfig

METADATA_KEY = "lora_adapter_metadata"
_PREFIXES = ("transformer.", "base_model.model.")


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def adapted_linears(model: nnx.Module) -> dict[str, Linear]:
    """``{diffusers module name: Linear}`` for every Linear that carries LoRA adapters; a block group stored
    stacked (`arr_jax.nn.stack.StackedBlocks`) gives one `BlockView` per block under its per-block name."""
    from arr_jax.nn.stack import unstacked_modules

    return dict(unstacked_modules(model, keep=lambda m: isinstance(m, Linear) and m.lora_a is not None))


def lora_state_dict(model: nnx.Module, *, prefix: str = "transformer", alpha_format: str = "bake",
                    dtype: Any = np.float32) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) in the diffusers/PEFT layout; see the module doc for ``alpha_format``."""
    if alpha_format not in ("bake", "metadata", "keys"):
        raise ValueError(f"alpha_format must be 'bake', 'metadata' or 'keys', got {alpha_format!r}")
    mods = adapted_linears(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to export")
    pre = f"{prefix}." if prefix else ""
    tensors: dict[str, np.ndarray] = {}
    ranks, scales = set(), set()
    for name, lin in sorted(mods.items()):
        a = np.asarray(lin.lora_a.get_value(), np.float32)  # (in, r)
        b = np.asarray(lin.lora_b.get_value(), np.float32)  # (r, out)
        rank, scale = a.shape[1], float(lin.lora_scale)
        ranks.add(rank)
        scales.add(scale)
        if alpha_format == "bake":
            b = b * np.float32(scale)
        tensors[f"{pre}{name}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(dtype)
        tensors[f"{pre}{name}.lora_B.weight"] = np.ascontiguousarray(b.T).astype(dtype)
        if alpha_format == "keys":
            tensors[f"{pre}{name}.alpha"] = np.asarray(scale * rank, np.float32)
    metadata = {"format": "pt"}
    if alpha_format == "metadata":
        if len(ranks) != 1 or len(scales) != 1:
            raise ValueError("alpha_format='metadata' needs one rank and one alpha for all modules; use 'bake'")
        rank, scale = ranks.pop(), scales.pop()
        meta = {f"{pre}r": rank, f"{pre}lora_alpha": scale * rank, f"{pre}target_modules": sorted(mods),
                f"{pre}init_lora_weights": True, f"{pre}use_rslora": False, f"{pre}use_dora": False,
                f"{pre}lora_bias": False, f"{pre}bias": "none", f"{pre}fan_in_fan_out": False}
        metadata[METADATA_KEY] = json.dumps(meta, sort_keys=True)
    return tensors, metadata


RUN_METADATA_KEY = "arr_jax_run"  # our run facts (rubric sha256, RPO settings), JSON, beside PEFT's own keys


def save_peft_lora(model: nnx.Module, path: str | Path, *, prefix: str = "transformer", alpha_format: str = "bake",
                   dtype: Any = np.float32, metadata: dict | None = None) -> Path:
    """Write the adapters to ``path`` (a ``.safetensors`` file, or a directory that gets
    ``pytorch_lora_weights.safetensors``, the name ``load_lora_weights(dir)`` looks for).

    ``metadata`` (JSON-able) is stored under the safetensors metadata key ``arr_jax_run``
    (read it back with `read_run_metadata`); loaders that do not know the key ignore it. The
    file is written to a temporary name and renamed, so a killed run never leaves half a file.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "pytorch_lora_weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = lora_state_dict(model, prefix=prefix, alpha_format=alpha_format, dtype=dtype)
    if metadata:
        meta[RUN_METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_run_metadata(path: str | Path) -> dict:
    """The ``metadata`` a LoRA file was saved with by `save_peft_lora` ({} when none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        raw = (f.metadata() or {}).get(RUN_METADATA_KEY)
    return json.loads(raw) if raw else {}


def _read(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors (float32) and the adapter metadata of a LoRA file (or a dir holding one)."""
    from arr_jax.convert.safetensors_io import SafetensorsCheckpoint

    path = Path(path)
    if path.is_dir():
        cands = sorted(path.glob("*.safetensors"))
        if len(cands) != 1:
            raise FileNotFoundError(f"{path} holds {len(cands)} .safetensors files; pass the LoRA file itself")
        path = cands[0]
    ckpt = SafetensorsCheckpoint(path)
    tensors = {k: np.asarray(v, np.float32) for k, v in ckpt.items()}
    raw = ckpt.files[0].metadata.get(METADATA_KEY)
    return tensors, (json.loads(raw) if raw else {})


_KOHYA_MARKERS = (".lora_down.", ".lora_up.", "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def _check_layout(tensors: dict[str, np.ndarray], path) -> None:
    """A file in another LoRA layout (kohya / sd-scripts names) is a ValueError naming the file and a key."""
    for key in sorted(tensors):
        if any(m in key for m in _KOHYA_MARKERS):
            raise ValueError(
                f"{path}: key {key!r} is a kohya / sd-scripts LoRA name (lora_down / lora_up, lora_unet_*), not "
                "the diffusers / PEFT layout (<module>.lora_A.weight / .lora_B.weight) this loader reads; convert it "
                "first, e.g. diffusers' FluxPipeline.load_lora_weights followed by save_lora_weights")


# Every field of PEFT's LoraConfig (0.21) and of diffusers' lora_adapter_metadata, sorted by what import does
# with it. A field that changes the adapters' maths is honoured or, when not at its default, refused by name.
_HONOURED_FIELDS = frozenset({"r", "lora_alpha", "use_rslora", "target_modules"})
# No effect on what a saved adapter computes at inference (bookkeeping, training-only, module selection, which
# the file's own tensor names already fix, or options of an init that leaves the base weights alone).
_INERT_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "exclude_modules", "layers_to_transform", "layers_pattern", "megatron_core",
    "qalora_group_size", "runtime_config", "ensure_weight_tying", "eva_config", "corda_config", "lora_ga_config",
    "init_lora_weights"})
# Fields that change the maths; accepted only at these defaults (None / {} / [] count as unset).
_REFUSED_UNLESS_DEFAULT = {
    "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "use_qalora": False,
    "rank_pattern": None, "alpha_pattern": None, "modules_to_save": None, "megatron_config": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None, "layer_replication": None,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "velora_config": None,
    "monteclora_config": None, "kasa_config": None, "loftq_config": None}
# init_lora_weights values whose adapters pair with modified base weights (the residual of the decomposition).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _unset(v) -> bool:
    return v is None or v == {} or v == [] or v == ()


def _check_fields(meta: dict, path) -> bool:
    """Refuse, naming them, the metadata fields this loader cannot honour; returns ``use_rslora``."""
    bad = []
    for key in sorted(meta):
        v = meta[key]
        if key in _HONOURED_FIELDS or key in _INERT_FIELDS and key != "init_lora_weights":
            continue
        if key == "init_lora_weights":
            if isinstance(v, str) and v.lower().startswith(_BASE_CHANGING_INITS):
                bad.append(f"init_lora_weights={v!r} (its adapters need the modified base weights)")
            continue
        if key in _REFUSED_UNLESS_DEFAULT:
            default = _REFUSED_UNLESS_DEFAULT[key]
            if not (_unset(v) or v == default):
                bad.append(f"{key}={v!r}")
            continue
        if not _unset(v) and v is not False:
            bad.append(f"{key}={v!r} (a field this loader does not know)")
    if bad:
        raise ValueError(f"{path}: the LoRA metadata sets {', '.join(bad)}; arr_jax adapters are plain LoRA "
                         "(x W + scale (x A) B, one rank); merge or convert the adapter to that form first")
    rslora = meta.get("use_rslora", False)
    if rslora not in (True, False):
        raise ValueError(f"{path}: LoRA metadata use_rslora={rslora!r} must be true or false")
    return bool(rslora)


def _modules(tensors: dict[str, np.ndarray], metadata: dict, path="the LoRA file") -> dict[str, dict]:
    """Group keys by module: ``{name: {"A": (r, in), "B": (out, r), "scale": alpha/r}}``."""
    _check_layout(tensors, path)
    meta = {}
    for k, v in metadata.items():
        for p in _PREFIXES:
            k = k.removeprefix(p)
        meta[k] = v
    out: dict[str, dict] = {}
    for key, arr in tensors.items():
        name = key
        for p in _PREFIXES:
            name = name.removeprefix(p)
        for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_A.default.weight", "A"),
                             (".lora_B.default.weight", "B"), (".alpha", "alpha")):
            if name.endswith(suffix):
                out.setdefault(name[: -len(suffix)], {})[slot] = arr
                break
        else:
            raise ValueError(f"{path}: key {key!r} is not a PEFT lora_A / lora_B / alpha tensor")
    rslora = _check_fields(meta, path)
    for name, m in out.items():
        if "A" not in m or "B" not in m:
            raise ValueError(f"{path}: LoRA module {name!r} lacks its {'lora_A' if 'A' not in m else 'lora_B'} weight")
        rank = m["A"].shape[0]
        if m["B"].shape[1] != rank:
            raise ValueError(f"{path}: LoRA module {name!r}: lora_A rank {rank} != lora_B rank {m['B'].shape[1]}")
        if "alpha" in m:
            alpha = float(m["alpha"])
        else:
            alpha = meta.get("lora_alpha")
            r = meta.get("r", rank)
            if alpha is not None and r != rank:
                raise ValueError(f"{path}: LoRA module {name!r}: metadata rank {r} != stored rank {rank}")
            alpha = (math.sqrt(rank) if rslora else rank) if alpha is None else float(alpha)  # no alpha: scale 1
        # PEFT's LoraLayer.update_layer: scaling = alpha / sqrt(r) with use_rslora, else alpha / r.
        m["scale"] = alpha / (math.sqrt(rank) if rslora else rank)
    return out


def lora_config_from_file(path: str | Path) -> LoRAConfig:
    """A `LoRAConfig` (rank, alpha, targets) that fits the adapters stored in ``path``.

    The targets are the file's module names, matched exactly (``match="exact"``): the model built
    with this config adapts every module the file names and only those, as PEFT does when diffusers
    loads the file. Raises ValueError for a file in the kohya layout, or whose modules do not share
    one rank and one alpha/r (naming the file and a module of each rank).
    """
    mods = _modules(*_read(path), path=path)
    by_rank: dict[int, str] = {}
    by_scale: dict[float, str] = {}
    for name in sorted(mods):
        by_rank.setdefault(mods[name]["A"].shape[0], name)
        by_scale.setdefault(mods[name]["scale"], name)
    if len(by_rank) != 1 or len(by_scale) != 1:
        raise ValueError(f"{path}: mixed ranks / scales are not supported (all modules need one rank and one "
                         f"alpha/r); rank: a module with it {dict(sorted(by_rank.items()))}; alpha/r: a module with it "
                         f"{dict(sorted(by_scale.items()))}")
    rank, scale = next(iter(by_rank)), next(iter(by_scale))
    return LoRAConfig(rank=rank, alpha=scale * rank, targets=tuple(sorted(mods)), match="exact")


def load_peft_lora(model: nnx.Module, path: str | Path, *, strict: bool = True) -> list[str]:
    """Fill ``model``'s LoRA adapters in place from a diffusers/PEFT file; returns the module names.

    The model must already carry adapters of the file's rank (e.g. built with
    ``lora=lora_config_from_file(path)``); each B is rescaled from the file's alpha/r to ours.
    ``strict``: adapters of the model that the file lacks are an error (else they are zeroed).
    """
    import jax.numpy as jnp

    mods = _modules(*_read(path), path=path)
    ours = adapted_linears(model)
    unknown = sorted(set(mods) - set(ours))
    if unknown:
        raise ValueError(f"{path}: LoRA modules with no adapted Linear in the model: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''} ({len(unknown)} in all)")
    missing = sorted(set(ours) - set(mods))
    if missing and strict:
        raise ValueError(f"{path} has no weights for the model's adapters {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all); pass strict=False to zero them")
    for name, lin in ours.items():
        a_old, b_old = lin.lora_a.get_value(), lin.lora_b.get_value()
        if name not in mods:
            lin.lora_b.set_value(jnp.zeros_like(b_old))
            continue
        m = mods[name]
        a, b = m["A"].T, m["B"].T * np.float32(m["scale"] / lin.lora_scale)  # (in, r), (r, out)
        if a.shape != tuple(a_old.shape) or b.shape != tuple(b_old.shape):
            raise ValueError(f"{path}: module {name!r} has A {a.shape} / B {b.shape} (ours as (in,r)/(r,out)) but the "
                             f"model's adapters are {tuple(a_old.shape)} / {tuple(b_old.shape)}")
        lin.lora_a.set_value(_like(a, a_old))
        lin.lora_b.set_value(_like(b, b_old))
    return sorted(mods)


def _like(x: np.ndarray, ref) -> Any:
    """``x`` with ``ref``'s dtype and sharding."""
    import jax

    sharding = getattr(ref, "sharding", None)
    x = np.asarray(x).astype(ref.dtype)
    return jax.device_put(x, sharding) if sharding is not None else jax.numpy.asarray(x)
