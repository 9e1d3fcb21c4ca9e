"""A whole diffusers Qwen-Image snapshot directory -> our models, tokenizer and processor.

Layout (Qwen/Qwen-Image, Qwen/Qwen-Image-Edit, Qwen/Qwen-Image-Edit-2509)::

    model_index.json   _class_name QwenImagePipeline | QwenImageEditPipeline | QwenImageEditPlusPipeline
    transformer/       QwenImageTransformer2DModel  -> `arr_jax.convert.qwen_image.load_qwen_image_transformer`
    vae/               AutoencoderKLQwenImage       -> `arr_jax.convert.qwen_image_vae.load_qwen_image_vae`
    text_encoder/      Qwen2_5_VLForConditionalGeneration -> `arr_jax.convert.qwen2_5_vl.load_qwen2_5_vl`
    tokenizer/         Qwen2 BPE: tokenizer.json, or vocab.json + merges.txt (+ added tokens in tokenizer_config.json)
    processor/         (edit pipelines) Qwen2VLProcessor: tokenizer files + preprocessor_config.json
    scheduler/         FlowMatchEulerDiscreteScheduler config (dynamic shift, shift_terminal)

The tokenizer is built with the ``tokenizers`` library from the snapshot's own files (no
transformers at run time), as transformers' ``Qwen2Tokenizer`` assembles it; images are prepared
by our Qwen-VL processor (`arr_jax.judge.processor`: the Qwen2-VL image processor is the same
smart-resize / normalise / patchify). A missing folder or file, or a snapshot of another model
(FLUX, Qwen-Image-Layered, ...), is an error that names it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from arr_jax.convert.snapshot import SchedulerConfig, SnapshotError, _files_fingerprint, _need

PIPELINES = {"QwenImagePipeline": "t2i", "QwenImageEditPipeline": "edit", "QwenImageEditPlusPipeline": "edit_plus"}
COMPONENTS = {
    "transformer": ("diffusers", ("QwenImageTransformer2DModel",)),
    "vae": ("diffusers", ("AutoencoderKLQwenImage",)),
    "text_encoder": ("transformers", ("Qwen2_5_VLForConditionalGeneration",)),
    "tokenizer": ("transformers", ("Qwen2Tokenizer", "Qwen2TokenizerFast")),
    "processor": ("transformers", ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")),
    "scheduler": ("diffusers", ("FlowMatchEulerDiscreteScheduler",)),
}
# Qwen2's pre-tokenisation regex (transformers' Qwen2Tokenizer / the snapshot's tokenizer.json)
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def read_qwen_model_index(path: str | Path) -> tuple[str, dict]:
    """Validate ``path/model_index.json`` and its component folders; returns (kind, index).

    kind: "t2i", "edit" or "edit_plus". Errors name the missing file / folder or the unexpected class.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"snapshot directory {path} does not exist")
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise FileNotFoundError(f"{index_file} is missing: {path} is not a diffusers snapshot directory")
    index = json.loads(index_file.read_text())
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise SnapshotError(f"{index_file}: _class_name {name!r} is not a Qwen-Image pipeline "
                            f"(expected one of {sorted(PIPELINES)})")
    kind = PIPELINES[name]
    needed = [c for c in COMPONENTS if c != "processor" or kind != "t2i"]
    for comp in needed:
        lib, classes = COMPONENTS[comp]
        entry = index.get(comp)
        if not entry or entry[1] is None:
            raise SnapshotError(f"{index_file} lists no {comp!r} component (expected {lib} {classes[0]})")
        if entry[1] not in classes:
            raise SnapshotError(f"{index_file}: component {comp!r} is {entry[0]} {entry[1]}, expected {lib} "
                                f"{' or '.join(classes)} -- this is not a Qwen-Image snapshot")
        if not (path / comp).is_dir():
            raise FileNotFoundError(f"snapshot {path} is missing the {comp}/ folder listed in model_index.json")
    return kind, index


def qwen2_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a Qwen2 tokenizer folder (tokenizer.json, else vocab.json +
    merges.txt with the added tokens of tokenizer_config.json / added_tokens.json, each checked to
    land on its declared id)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    if (path / "tokenizer.json").exists():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    vocab = json.loads(_need(path / "vocab.json", "the Qwen2 vocabulary (or tokenizer.json)").read_text())
    lines = _need(path / "merges.txt", "the Qwen2 BPE merges").read_text().splitlines()
    merges = [tuple(l.split(" ")) for l in lines if l and not l.startswith("#version")]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    added: dict[int, tuple[str, bool]] = {}
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.exists():
        for i, t in (json.loads(cfg_file.read_text()).get("added_tokens_decoder") or {}).items():
            added[int(i)] = (t["content"], bool(t.get("special", True)))
    if (path / "added_tokens.json").exists():
        for content, i in json.loads((path / "added_tokens.json").read_text()).items():
            added.setdefault(int(i), (content, True))
    for i in sorted(added):
        content, special = added[i]
        tok.add_tokens([AddedToken(content, special=special, normalized=not special)])
        if tok.token_to_id(content) != i:
            raise SnapshotError(f"{path}: added token {content!r} should have id {i} but lands on "
                                f"{tok.token_to_id(content)} (vocab.json has {len(vocab)} entries)")
    return tok


@dataclasses.dataclass
class QwenImageSnapshot:
    """Everything a Qwen-Image pipeline needs, loaded from one snapshot directory."""

    path: Path
    kind: str                  # "t2i", "edit" or "edit_plus"
    transformer: Any           # arr_jax.models.qwen_image.QwenImageTransformer
    vae: Any                   # arr_jax.models.qwen_image_vae.QwenImageVAE
    text_encoder: Any          # arr_jax.models.qwen2_5_vl.Qwen25VLEncoder
    text_config: Any           # arr_jax.models.qwen2_5_vl.Qwen25VLConfig
    processor: Any             # arr_jax.judge.processor.Qwen3VLProcessor (tokenizer + image preprocessing)
    scheduler: SchedulerConfig

    def text_fingerprint(self, text_dtype: Any) -> str:
        """Keys the prompt-embedding cache: tokenizer, image preprocessing, encoder files, dtype, pipeline kind."""
        import numpy as np

        h = hashlib.sha256()
        for part in (self.processor.tokenizer.to_str(), repr(self.processor.image_cfg), self.kind,
                     _files_fingerprint(self.path / "text_encoder"), str(np.dtype(text_dtype))):
            h.update(part.encode())
        return h.hexdigest()


def load_qwen_image_snapshot(path: str | Path, *, dtype: Any = "float32", param_dtype: Any = None,
                             text_dtype: Any = None, vae_dtype: Any = None, rules=None, lora=None, lora_seed: int = 0,
                             expect: str | tuple[str, ...] | None = None,
                             **transformer_overrides) -> QwenImageSnapshot:
    """Load a Qwen-Image / Qwen-Image-Edit / Qwen-Image-Edit-2509 snapshot directory.

    Args:
      dtype / param_dtype: transformer compute / storage dtype ("bfloat16" for real runs).
      text_dtype, vae_dtype: dtypes of the text encoder and the VAE (default: ``dtype``).
      rules: `ShardingRules` with a mesh: every weight goes straight onto its shards.
      lora: a `LoRAConfig` to attach fresh adapters to the transformer.
      expect: a kind (or kinds) to insist on, e.g. ("edit", "edit_plus").
    Cross-checks the components (latent channels, text width, image token) and names any mismatch.
    """
    import jax.numpy as jnp

    from arr_jax.convert.qwen2_5_vl import load_qwen2_5_vl
    from arr_jax.convert.qwen_image import load_qwen_image_transformer
    from arr_jax.convert.qwen_image_vae import load_qwen_image_vae
    from arr_jax.judge.processor import ImageConfig, Qwen3VLProcessor

    def dt(x):
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(x, x) \
            if isinstance(x, str) else x

    path = Path(path)
    kind, _ = read_qwen_model_index(path)
    wanted = (expect,) if isinstance(expect, str) else expect
    if wanted is not None and kind not in wanted:
        raise SnapshotError(f"{path} holds a Qwen-Image {kind} pipeline, but {' or '.join(wanted)} was asked for")
    dtype = dt(dtype)
    text_dtype = dt(text_dtype) if text_dtype is not None else dtype
    vae_dtype = dt(vae_dtype) if vae_dtype is not None else dtype
    for comp in ("transformer", "vae", "text_encoder"):
        _need(path / comp / "config.json", f"the {comp} config")
    tok_dir = path / ("processor" if kind != "t2i" else "tokenizer")
    tokenizer = qwen2_tokenizer(tok_dir)
    image_cfg = ImageConfig(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56,
                            max_pixels=28 * 28 * 1280)
    if kind != "t2i":
        pre = _need(tok_dir / "preprocessor_config.json", "the image processor config")
        image_cfg = ImageConfig.from_hf(json.loads(pre.read_text()))
    try:
        processor = Qwen3VLProcessor(tokenizer, image_cfg)
    except ValueError as e:
        raise SnapshotError(f"{tok_dir}: {e}") from None
    scheduler = SchedulerConfig.from_dir(path / "scheduler", allow_shift_terminal=True)
    transformer = load_qwen_image_transformer(path / "transformer", dtype=dtype, param_dtype=param_dtype,
                                              rules=rules, lora=lora, lora_seed=lora_seed, **transformer_overrides)
    vae = load_qwen_image_vae(path / "vae", vae_dtype, rules=rules)
    text_encoder, text_cfg = load_qwen2_5_vl(path / "text_encoder", text_dtype, rules=rules)
    cfg = transformer.config
    if cfg.in_channels != 4 * vae.config.z_dim:
        raise SnapshotError(f"{path}: transformer in_channels {cfg.in_channels} != 4 x VAE z_dim {vae.config.z_dim}")
    if cfg.joint_attention_dim != text_cfg.text.hidden_size:
        raise SnapshotError(f"{path}: transformer joint_attention_dim {cfg.joint_attention_dim} != text encoder "
                            f"hidden_size {text_cfg.text.hidden_size}")
    if processor.image_token_id != text_cfg.image_token_id:
        raise SnapshotError(f"{tok_dir}: <|image_pad|> is token {processor.image_token_id} but the text encoder's "
                            f"config says {text_cfg.image_token_id}")
    if kind != "t2i" and (image_cfg.patch_size != text_cfg.vision.patch_size
                          or image_cfg.merge_size != text_cfg.vision.spatial_merge_size):
        raise SnapshotError(f"{tok_dir}: processor patch/merge {image_cfg.patch_size}/{image_cfg.merge_size} != the "
                            f"vision tower's {text_cfg.vision.patch_size}/{text_cfg.vision.spatial_merge_size}")
    return QwenImageSnapshot(path=path, kind=kind, transformer=transformer, vae=vae, text_encoder=text_encoder,
                             text_config=text_cfg, processor=processor, scheduler=scheduler)
