"""A tiny random diffusers FLUX pipeline (all six components + scheduler) for parity tests.

`build_tiny_pipeline` returns an in-memory diffusers ``FluxPipeline`` and writes it with
``save_pretrained`` into a snapshot directory laid out like FLUX.1-dev (the CLIP tokenizer as
``vocab.json`` + ``merges.txt`` without ``tokenizer.json``, as the real snapshot ships it).
Sizes: 32x32 images, VAE factor 2 (16x16x16 latents -> 64 packed tokens of 64 channels),
CLIP width 16 (pooled 16), T5 width 32, token limits 16 (CLIP) and 16 (T5 max_sequence_length).
"""
from __future__ import annotations

import json
from pathlib import Path

CLIP_MAX = 16
T5_MAX = 16
IMAGE = 32

TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                   axes_dims_rope=(4, 6, 6), guidance_embeds=True)
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4, layers_per_block=1,
           use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=CLIP_MAX, hidden_act="quick_gelu", projection_dim=16)
T5 = dict(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)

_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!'-"
_CLIP_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
_T5_WORDS = ["a", "red", "cat", "dog", "and", "the", "on", "blue", "big", "photo", "of"]


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary: characters, characters + ``</w>``, a few merges, then bos/eos (the
    largest ids, so the legacy argmax end-of-text rule finds the eos)."""
    vocab: dict[str, int] = {}
    for c in _CHARS:
        vocab[c] = len(vocab)
    for c in _CHARS:
        vocab[c + "</w>"] = len(vocab)
    for a, b in _CLIP_MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, list(_CLIP_MERGES)


def t5_pieces() -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0 - 0.1 * i) for i, w in enumerate(_T5_WORDS)]
    pieces += [(c, -8.0) for c in _CHARS]
    return pieces


def _perturb(model, scale: float = 0.05) -> None:
    """Make every parameter generic (random init leaves norms at 1 and some biases at 0)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.add_(scale * torch.randn_like(p))


def build_tiny_pipeline(snapshot_dir: str | Path | None = None, *, kontext: bool = False, seed: int = 0):
    """A tiny random diffusers FluxPipeline (or FluxKontextPipeline), saved to ``snapshot_dir`` if given."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    vocab, merges = clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX)
    tokenizer_2 = T5Tokenizer(vocab=t5_pieces(), extra_ids=0, model_max_length=T5_MAX)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), eos_token_id=vocab["<|endoftext|>"],
                                        bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                                        **CLIP)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **T5)).eval()
    transformer = FluxTransformer2DModel(**TRANSFORMER).eval()
    vae = AutoencoderKL(**VAE).eval()
    for m in (clip, t5, transformer, vae):
        _perturb(m)
    cls = FluxKontextPipeline if kontext else FluxPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=clip,
               tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    if snapshot_dir is not None:
        save_snapshot(pipe, snapshot_dir)
    return pipe


def save_snapshot(pipe, snapshot_dir: str | Path) -> Path:
    """``pipe.save_pretrained``, with the CLIP tokenizer rewritten as FLUX.1-dev ships it."""
    snapshot_dir = Path(snapshot_dir)
    pipe.save_pretrained(snapshot_dir)
    vocab, merges = clip_vocab()
    # FLUX.1-dev ships the CLIP tokenizer as vocab.json + merges.txt (no tokenizer.json).
    tok_dir = snapshot_dir / "tokenizer"
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return snapshot_dir
