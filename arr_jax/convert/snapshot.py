"""A whole diffusers FLUX snapshot directory -> our models + tokenizers.

Layout (FLUX.1-dev, FLUX.1-Kontext-dev)::

    model_index.json       _class_name FluxPipeline | FluxKontextPipeline, one entry per component
    transformer/           FluxTransformer2DModel     -> `arr_jax.convert.flux.load_flux_transformer`
    vae/                   AutoencoderKL              -> `arr_jax.convert.vae.load_vae`
    text_encoder/          CLIPTextModel (CLIP-L)     -> `arr_jax.convert.clip_text.load_clip_text`
    text_encoder_2/        T5EncoderModel (T5-XXL)    -> `arr_jax.convert.t5.load_t5_encoder`
    tokenizer/             CLIP BPE: tokenizer.json, or vocab.json + merges.txt (as FLUX.1-dev ships it)
    tokenizer_2/           T5 unigram: tokenizer.json
    scheduler/             FlowMatchEulerDiscreteScheduler config (the resolution-dependent shift)

Tokenizers are built with the ``tokenizers`` library from the snapshot's own files (no
transformers import at run time); the CLIP one is assembled exactly as transformers'
``CLIPTokenizer`` assembles it. A missing folder or file, or a snapshot of another model,
is an error that names it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

PIPELINES = {"FluxPipeline": "flux", "FluxKontextPipeline": "kontext"}
# component -> (library, accepted class names)
COMPONENTS = {
    "transformer": ("diffusers", ("FluxTransformer2DModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "text_encoder_2": ("transformers", ("T5EncoderModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "tokenizer_2": ("transformers", ("T5TokenizerFast", "T5Tokenizer")),
    "scheduler": ("diffusers", ("FlowMatchEulerDiscreteScheduler",)),
}


class SnapshotError(ValueError):
    """A snapshot directory is incomplete or holds a different model."""


# ---------------------------------------------------------------------------- model_index

def read_model_index(path: str | Path, components: Sequence[str] = tuple(COMPONENTS)) -> tuple[str, dict]:
    """Validate ``path/model_index.json`` and the listed component folders; returns (kind, index).

    kind is "flux" or "kontext". Errors name the missing file / folder or the unexpected class.
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
        raise SnapshotError(f"{index_file}: _class_name {name!r} is not a FLUX pipeline "
                            f"(expected one of {sorted(PIPELINES)})")
    for comp in components:
        lib, classes = COMPONENTS[comp]
        entry = index.get(comp)
        if not entry or entry[1] is None:
            raise SnapshotError(f"{index_file} lists no {comp!r} component (expected {lib} {classes[0]})")
        if entry[1] not in classes:
            raise SnapshotError(f"{index_file}: component {comp!r} is {entry[0]} {entry[1]}, expected {lib} "
                                f"{' or '.join(classes)} -- this is not a FLUX.1 snapshot")
        if not (path / comp).is_dir():
            raise FileNotFoundError(f"snapshot {path} is missing the {comp}/ folder listed in model_index.json")
    return PIPELINES[name], index


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing ({what})")
    return path


# ---------------------------------------------------------------------------- scheduler

@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The FlowMatchEulerDiscreteScheduler fields FLUX's sigma schedule depends on."""

    shift: float = 3.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    num_train_timesteps: int = 1000
    shift_terminal: float = 0.0  # Qwen-Image: 0.02 (the shifted schedule is stretched to end there)

    @classmethod
    def from_dir(cls, path: str | Path, allow_shift_terminal: bool = False) -> "SchedulerConfig":
        """Parse ``path/scheduler_config.json``; unsupported options are a `SnapshotError` naming the file.

        ``allow_shift_terminal``: accept a nonzero ``shift_terminal`` (the Qwen-Image pipelines'
        schedule implements it; FLUX's does not).
        """
        f = _need(Path(path) / "scheduler_config.json", "the scheduler config")
        d = json.loads(f.read_text())
        if d.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
            raise SnapshotError(f"{f}: expected FlowMatchEulerDiscreteScheduler, got {d.get('_class_name')!r}")
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                     "stochastic_sampling"):
            if d.get(flag):
                raise SnapshotError(f"{f}: {flag}=true is not supported")
        if d.get("time_shift_type", "exponential") != "exponential":
            raise SnapshotError(f"{f}: only the exponential time shift is supported")
        if d.get("shift_terminal") and not allow_shift_terminal:
            raise SnapshotError(f"{f}: shift_terminal is not supported by this pipeline")
        names = {x.name for x in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


# ---------------------------------------------------------------------------- tokenizers

def _token_str(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _clip_from_vocab(vocab: dict, merges: list, unk: str, bos: str, eos: str):
    """transformers' ``CLIPTokenizer`` backend, assembled from a vocabulary and merges."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                   r"""[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in dict.fromkeys((bos, eos, unk)) if t in vocab])
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False,
                                                      add_prefix_space=False)
    return tok


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with FLUX's padding rule: pad (or truncate) to ``max_length``.

    ``__call__(prompts) -> (ids (B, max_length) int32, lengths (B,))`` where ``lengths`` is the
    untruncated token count (special tokens included); ``lengths > max_length`` = truncated.
    """

    def __init__(self, tokenizer, max_length: int, pad_id: int, name: str):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tok, self.max_length, self.pad_id, self.name = tokenizer, int(max_length), int(pad_id), name
        self._cut = type(tokenizer).from_str(tokenizer.to_str())
        self._cut.enable_truncation(self.max_length)
        self._cut.enable_padding(length=self.max_length, pad_id=self.pad_id)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.tok.to_str().encode())
        h.update(f"{self.max_length}/{self.pad_id}".encode())
        return h.hexdigest()

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        prompts = list(prompts)
        ids = np.array([e.ids for e in self._cut.encode_batch(prompts)], np.int32).reshape(len(prompts), -1)
        lengths = np.array([len(e.ids) for e in self.tok.encode_batch(prompts)], np.int32)
        return ids, lengths

    @classmethod
    def from_dir(cls, path: str | Path, kind: str, max_length: int | None = None) -> "TextTokenizer":
        """Load ``tokenizer/`` (kind "clip") or ``tokenizer_2/`` (kind "t5") of a snapshot."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder {path} does not exist")
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        special = path / "special_tokens_map.json"
        if special.exists():
            cfg = {**{k: v for k, v in json.loads(special.read_text()).items()}, **cfg}
        tok_json = path / "tokenizer.json"
        if kind == "clip":
            unk = _token_str(cfg.get("unk_token")) or "<|endoftext|>"
            bos = _token_str(cfg.get("bos_token")) or "<|startoftext|>"
            eos = _token_str(cfg.get("eos_token")) or "<|endoftext|>"
            pad = _token_str(cfg.get("pad_token")) or eos
            if tok_json.exists():
                tok = Tokenizer.from_file(str(tok_json))
            else:
                vocab = json.loads(_need(path / "vocab.json", "the CLIP vocabulary (or tokenizer.json)").read_text())
                lines = _need(path / "merges.txt", "the CLIP BPE merges").read_text().splitlines()
                merges = [tuple(l.split()) for l in lines if l and not l.startswith("#version")]
                tok = _clip_from_vocab(vocab, merges, unk, bos, eos)
            default_len = 77
        elif kind == "t5":
            pad = _token_str(cfg.get("pad_token")) or "<pad>"
            tok = Tokenizer.from_file(str(_need(tok_json, "the T5 tokenizer (tokenizers JSON)")))
            default_len = 512
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}; use 'clip' or 't5'")
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise SnapshotError(f"{path}: pad token {pad!r} is not in the vocabulary")
        model_max = cfg.get("model_max_length")
        if max_length is None:
            max_length = model_max if isinstance(model_max, int) and model_max < 100_000 else default_len
        return cls(tok, max_length, pad_id, name=f"{kind}:{path}")


# ---------------------------------------------------------------------------- the snapshot

_SAMPLES, _SAMPLE_BYTES = 16, 4096


def _files_fingerprint(folder: Path) -> str:
    """Hash of the JSON files and every safetensors file in ``folder``: its header (names, shapes, dtypes),
    its size and 16 samples of 4 KiB of its data at fixed positions (cheap: 64 KiB read per file).
    A header alone would not change when weights of the same shapes are re-trained in place."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
        else:
            size = f.stat().st_size
            h.update(str(size).encode())
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 1 << 26)))
                start = 8 + n
                for k in range(_SAMPLES):
                    fh.seek(start + (size - start) * k // _SAMPLES)
                    h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


@dataclasses.dataclass
class FluxSnapshot:
    """Everything a FLUX pipeline needs, loaded from one snapshot directory."""

    path: Path
    kind: str                       # "flux" or "kontext"
    transformer: Any                # arr_jax.models.flux.FluxTransformer
    vae: Any                        # arr_jax.models.vae.AutoencoderKL
    clip: Any                       # arr_jax.models.clip_text.CLIPTextModel
    t5: Any                         # arr_jax.models.t5.T5Encoder
    clip_tokenizer: TextTokenizer
    t5_tokenizer: TextTokenizer
    scheduler: SchedulerConfig

    def text_fingerprint(self, text_dtype: Any) -> str:
        """Keys the prompt-embedding cache: both tokenizers, both encoders' files, the dtype."""
        h = hashlib.sha256()
        for part in (self.clip_tokenizer.fingerprint, self.t5_tokenizer.fingerprint,
                     _files_fingerprint(self.path / "text_encoder"), _files_fingerprint(self.path / "text_encoder_2"),
                     str(np.dtype(text_dtype))):
            h.update(part.encode())
        return h.hexdigest()


def load_flux_snapshot(path: str | Path, *, dtype: Any = "float32", param_dtype: Any = None,
                       text_dtype: Any = None, vae_dtype: Any = None, rules=None, lora=None, lora_seed: int = 0,
                       t5_max_length: int = 512, expect: str | None = None, **transformer_overrides) -> FluxSnapshot:
    """Load a FLUX.1 / FLUX.1-Kontext snapshot directory.

    Args:
      dtype / param_dtype: transformer compute / storage dtype ("bfloat16" for real runs).
      text_dtype, vae_dtype: dtypes of the text encoders and the VAE (default: ``dtype``).
      rules: `ShardingRules` with a mesh: every weight goes straight onto its shards.
      lora: a `LoRAConfig` to attach fresh adapters to the transformer.
      t5_max_length: T5 token limit (FLUX.1-dev: 512).
      expect: "flux" or "kontext" to insist on one pipeline class.
    """
    import jax.numpy as jnp

    from arr_jax.convert.clip_text import load_clip_text
    from arr_jax.convert.flux import load_flux_transformer
    from arr_jax.convert.t5 import load_t5_encoder
    from arr_jax.convert.vae import load_vae

    def dt(x):
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(x, x) \
            if isinstance(x, str) else x

    path = Path(path)
    kind, _ = read_model_index(path)
    if expect is not None and kind != expect:
        raise SnapshotError(f"{path} holds a {kind} pipeline, but a {expect} pipeline was asked for")
    dtype = dt(dtype)
    text_dtype = dt(text_dtype) if text_dtype is not None else dtype
    vae_dtype = dt(vae_dtype) if vae_dtype is not None else dtype
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _need(path / comp / "config.json", f"the {comp} config")
    clip_tok = TextTokenizer.from_dir(path / "tokenizer", "clip")
    t5_tok = TextTokenizer.from_dir(path / "tokenizer_2", "t5", max_length=t5_max_length)
    scheduler = SchedulerConfig.from_dir(path / "scheduler")
    transformer = load_flux_transformer(path / "transformer", dtype=dtype, param_dtype=param_dtype, rules=rules,
                                        lora=lora, lora_seed=lora_seed, **transformer_overrides)
    vae = load_vae(path / "vae", vae_dtype, rules=rules)
    clip = load_clip_text(path / "text_encoder", text_dtype, rules=rules)
    t5 = load_t5_encoder(path / "text_encoder_2", text_dtype, rules=rules)
    cfg = transformer.config
    if cfg.in_channels != 4 * vae.config.latent_channels:
        raise SnapshotError(f"{path}: transformer in_channels {cfg.in_channels} != 4 x VAE latent_channels "
                            f"{vae.config.latent_channels}")
    if cfg.joint_attention_dim != t5.config.d_model:
        raise SnapshotError(f"{path}: transformer joint_attention_dim {cfg.joint_attention_dim} != T5 d_model "
                            f"{t5.config.d_model}")
    if cfg.pooled_projection_dim != clip.config.hidden_size:
        raise SnapshotError(f"{path}: transformer pooled_projection_dim {cfg.pooled_projection_dim} != CLIP "
                            f"hidden_size {clip.config.hidden_size}")
    if clip_tok.max_length > clip.config.max_position_embeddings:
        raise SnapshotError(f"{path}: CLIP tokenizer max length {clip_tok.max_length} exceeds the text encoder's "
                            f"{clip.config.max_position_embeddings} positions")
    return FluxSnapshot(path=path, kind=kind, transformer=transformer, vae=vae, clip=clip, t5=t5,
                        clip_tokenizer=clip_tok, t5_tokenizer=t5_tok, scheduler=scheduler)
