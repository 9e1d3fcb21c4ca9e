"""Tiny random diffusers Qwen-Image pipelines (text-to-image, Edit, Edit-Plus/2509) for parity tests.

`build_tiny` returns the torch components and the three diffusers pipelines sharing them;
`save_snapshot` writes them in the diffusers layout of the real snapshots, component by
component (the pipelines' own ``save_pretrained`` fails without a video processor):

    model_index.json   QwenImagePipeline | QwenImageEditPipeline | QwenImageEditPlusPipeline
    transformer/       QwenImageTransformer2DModel   (3 heads x 16, 2 blocks, in 16 = 4 x z_dim 4)
    vae/               AutoencoderKLQwenImage        (base_dim 8, z_dim 4, factor 8)
    text_encoder/      Qwen2_5_VLForConditionalGeneration (width 64, 2 layers; vision: patch 4,
                       window 16 = 2 merged units, full attention in block 1 of 3)
    tokenizer/         vocab.json + merges.txt + tokenizer_config.json (as Qwen-Image ships it)
    processor/         tokenizer.json + preprocessor_config.json (edit pipelines only)
    scheduler/         FlowMatchEulerDiscreteScheduler with Qwen-Image's config (shift_terminal 0.02)

The pipelines resize to hard-coded areas (VAE 1024^2, condition 384^2); `small_areas` patches
those module constants for a test so 64^2 images stay 64^2.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=3, joint_attention_dim=64, axes_dims_rope=(4, 6, 6))
VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 2.0, 1.1])
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, temporal_patch_size=2,
              spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1], out_hidden_size=64, in_channels=3)
PREPROC = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=64 * 64,
               image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
# Qwen-Image's scheduler_config.json
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
                 shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential")
VAE_AREA, COND_AREA = 64 * 64, 32 * 32  # stand-ins for diffusers' 1024^2 and 384^2
CLASSES = {"t2i": "QwenImagePipeline", "edit": "QwenImageEditPipeline", "edit_plus": "QwenImageEditPlusPipeline"}

_CORPUS = ["a red cat on the blue sofa", "make the sky green", "turn the dog into a cat", "add a hat to the man",
           "remove the car", "Picture 1: Picture 2: Picture 3:", "describe the image and the edit"]


def _perturb(model, scale: float = 0.05) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or (p.ndim == 1 and "norm" in name):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.add_(scale * torch.randn_like(p))


def train_tokenizer():
    """A byte-level BPE (Qwen2Tokenizer) with the Qwen special tokens appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    vocab = dict(tok.get_vocab())
    vocab["<|endoftext|>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    qt = Qwen2Tokenizer(vocab=vocab, merges=merges)
    qt.add_tokens([AddedToken(t, special=True) for t in SPECIAL])
    return qt, vocab, merges


def make_processor(tokenizer):
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class NoVideoProcessor(Qwen2VLProcessor):
        """transformers 5 checks the video processor's class, which needs torchvision; skip it for None."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return NoVideoProcessor(image_processor=Qwen2VLImageProcessorPil(**PREPROC), tokenizer=tokenizer,
                            video_processor=None)


def build_tiny(seed: int = 0) -> dict:
    """Torch components + the three diffusers pipelines sharing them."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageEditPlusPipeline, QwenImagePipeline, QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer, vocab, merges = train_tokenizer()
    processor = make_processor(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2_5_VLConfig(text_config=dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=eos, **TEXT),
                           vision_config=VISION,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    transformer = QwenImageTransformer2DModel(**TRANSFORMER).eval()
    vae = AutoencoderKLQwenImage(**VAE).eval()
    for m in (text_encoder, transformer, vae):
        _perturb(m)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    comps = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipes = {"t2i": QwenImagePipeline(**comps), "edit": QwenImageEditPipeline(processor=processor, **comps),
             "edit_plus": QwenImageEditPlusPipeline(processor=processor, **comps)}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    forward_mm_token_type_ids(text_encoder)
    return {"pipes": pipes, "processor": processor, "tokenizer": tokenizer, "vocab": vocab, "merges": merges,
            "text_encoder": text_encoder, "transformer": transformer, "vae": vae}


def forward_mm_token_type_ids(text_encoder) -> None:
    """diffusers 0.42 does not pass the processor's ``mm_token_type_ids`` to Qwen2.5-VL, so transformers 5
    falls back to sequential positions (diffusers issue #14194, fix in PR #14189). Add them (image tokens
    = 1, as the processor makes them) so the reference uses the multimodal positions the model was trained with."""
    orig = text_encoder.forward

    def forward(*args, **kwargs):
        if kwargs.get("pixel_values") is not None and kwargs.get("mm_token_type_ids") is None:
            kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == text_encoder.config.image_token_id).int()
        return orig(*args, **kwargs)

    text_encoder.forward = forward


def save_snapshot(tiny: dict, kind: str, snapshot_dir: str | Path) -> Path:
    """Write the components of pipeline ``kind`` ("t2i", "edit", "edit_plus") in the diffusers layout."""
    d = Path(snapshot_dir)
    d.mkdir(parents=True, exist_ok=True)
    tiny["transformer"].save_pretrained(d / "transformer")
    tiny["vae"].save_pretrained(d / "vae")
    tiny["text_encoder"].save_pretrained(d / "text_encoder")
    tiny["pipes"]["t2i"].scheduler.save_pretrained(d / "scheduler")
    tok_dir = d / "tokenizer"
    tiny["tokenizer"].save_pretrained(tok_dir)
    # Qwen-Image ships the tokenizer as vocab.json + merges.txt (+ added tokens in tokenizer_config.json)
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(tiny["vocab"]))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tiny["merges"]))
    cfg_file = tok_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    tok = tiny["tokenizer"]
    tcfg["added_tokens_decoder"] = {str(tok.convert_tokens_to_ids(t)): {"content": t, "special": True}
                                    for t in ["<|endoftext|>"] + SPECIAL}
    cfg_file.write_text(json.dumps(tcfg))
    index = {"_class_name": CLASSES[kind], "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder":
             ["transformers", "Qwen2_5_VLForConditionalGeneration"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    if kind != "t2i":
        proc_dir = d / "processor"
        tiny["tokenizer"].save_pretrained(proc_dir)
        tiny["processor"].image_processor.save_pretrained(proc_dir)
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (d / "model_index.json").write_text(json.dumps(index, indent=1))
    return d


@contextlib.contextmanager
def small_areas(vae_area: int = VAE_AREA, cond_area: int = COND_AREA):
    """Patch the pipelines' hard-coded resize areas (1024^2 VAE / Edit, 384^2 condition) for a test."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    saved = (plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE, edit.calculate_dimensions, plus.calculate_dimensions)
    plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE = vae_area, cond_area
    for mod, orig in ((edit, saved[2]), (plus, saved[3])):  # the target size uses a literal 1024 * 1024
        mod.calculate_dimensions = (lambda o: lambda area, ratio: o(vae_area if area == 1024 * 1024 else area,
                                                                    ratio))(orig)
    try:
        yield
    finally:
        plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE, edit.calculate_dimensions, plus.calculate_dimensions = saved
