"""LoRA export to / import from the diffusers-PEFT safetensors layout."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arr_jax.convert.lora_peft import (adapted_linears, load_peft_lora, lora_config_from_file, lora_state_dict,
                                       save_peft_lora)
from arr_jax.models.flux import FluxConfig, FluxTransformer
from arr_jax.nn.lora import LoRAConfig

FORMATS = ["bake", "metadata", "keys"]


def _randomize(model, seed=0, scale=0.1):
    """Nonzero adapters (fresh ones have B = 0)."""
    rng = np.random.default_rng(seed)
    for lin in adapted_linears(model).values():
        for v in (lin.lora_a, lin.lora_b):
            v.set_value(jnp.asarray(scale * rng.standard_normal(v.get_value().shape), jnp.float32))


def _inputs(n=16, channels=16, txt_dim=32, pooled=16, b=2, length=5, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack(np.meshgrid(np.zeros(1), np.arange(4), np.arange(n // 4), indexing="ij"), -1).reshape(n, 3)
    return dict(img=rng.standard_normal((b, n, channels), np.float32), txt=rng.standard_normal((b, length, txt_dim), np.float32),
                pooled=rng.standard_normal((b, pooled), np.float32), timestep=np.array([0.7, 0.2], np.float32),
                img_ids=ids.astype(np.float32), txt_ids=np.zeros((length, 3), np.float32),
                guidance=np.array([3.5, 2.0], np.float32))


def _ours(model, x):
    """Jitted forward (eager op-by-op dispatch of a whole Flux costs seconds per new shape)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_forward(graphdef)(state, {k: jnp.asarray(v) for k, v in x.items()}))


_CACHE = {}


def _jit_forward(graphdef):
    if graphdef not in _CACHE:
        _CACHE[graphdef] = jax.jit(lambda st, x: nnx.merge(graphdef, st)(**x))
    return _CACHE[graphdef]


def _tiny(lora):
    return FluxTransformer(FluxConfig.tiny(lora=lora), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_between_alphas(tmp_path, fmt):
    """Export with alpha/r = 4, import into a model with alpha/r = 0.5: same outputs."""
    src = _tiny(LoRAConfig(rank=4, alpha=16.0))
    _randomize(src)
    x = _inputs()
    want = _ours(src, x)
    path = save_peft_lora(src, tmp_path / "lora.safetensors", alpha_format=fmt)
    cfg = lora_config_from_file(path)
    assert cfg.rank == 4 and cfg.scale == pytest.approx(1.0 if fmt == "bake" else 4.0)
    dst = _tiny(LoRAConfig(rank=4, alpha=2.0))
    assert np.abs(_ours(dst, x) - want).max() > 1e-3  # adapters matter
    names = load_peft_lora(dst, path)
    assert len(names) == len(adapted_linears(src)) == 2 * 8 + 2 * 3
    np.testing.assert_allclose(_ours(dst, x), want, rtol=1e-5, atol=1e-5)


def test_names_shapes_and_metadata():
    model = _tiny(LoRAConfig(rank=4, alpha=8.0))
    _randomize(model)
    tensors, meta = lora_state_dict(model, alpha_format="metadata")
    a = tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    b = tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    lin = model.transformer_blocks[0].attn.to_q
    assert a.shape == (4, lin.in_features) and b.shape == (lin.out_features, 4)
    np.testing.assert_array_equal(b, np.asarray(lin.lora_b.get_value()).T)  # unscaled in this format
    assert "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight" in tensors
    assert "transformer.single_transformer_blocks.1.attn.to_k.lora_B.weight" in tensors
    m = json.loads(meta["lora_adapter_metadata"])
    assert m["transformer.r"] == 4 and m["transformer.lora_alpha"] == 8.0
    baked, meta_b = lora_state_dict(model)
    np.testing.assert_allclose(baked["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"], 2.0 * b)
    assert "lora_adapter_metadata" not in meta_b


def test_import_errors(tmp_path):
    src = _tiny(LoRAConfig(rank=4, alpha=4.0))
    _randomize(src)
    path = save_peft_lora(src, tmp_path)  # a directory -> pytorch_lora_weights.safetensors
    assert path.name == "pytorch_lora_weights.safetensors"
    with pytest.raises(ValueError, match=r"lora_A .*\(4, 64\).*\(64, 2\)|has A"):
        load_peft_lora(_tiny(LoRAConfig(rank=2, alpha=2.0)), path)
    few = _tiny(LoRAConfig(rank=4, alpha=4.0, targets=("attn.to_q",)))
    with pytest.raises(ValueError, match=r"no adapted Linear in the model: \['single_transformer_blocks\.0\.attn\.to_k'"):
        load_peft_lora(few, path)
    more = _tiny(LoRAConfig(rank=4, alpha=4.0, targets=("attn.to_q", "ff.net.2")))
    only_q = save_peft_lora(_tiny(LoRAConfig(rank=4, alpha=4.0, targets=("attn.to_q",))), tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match=r"no weights for the model's adapters \['transformer_blocks\.0\.ff\.net\.2'"):
        load_peft_lora(more, only_q)
    _randomize(more)
    load_peft_lora(more, only_q, strict=False)
    assert float(jnp.abs(more.transformer_blocks[0].ff.net[2].lora_b.get_value()).max()) == 0.0
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_state_dict(_tiny(None))


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from _tiny_flux import build_tiny_pipeline

    path = tmp_path_factory.mktemp("lora_snapshot")
    return build_tiny_pipeline(path), path


@pytest.mark.parity
@pytest.mark.parametrize("fmt", FORMATS)
def test_diffusers_load_lora_weights_matches(tiny_diffusers, tmp_path, fmt):
    """Our LoRA, exported and loaded with ``FluxPipeline.load_lora_weights``, gives our output."""
    import torch

    from arr_jax.convert.flux import load_flux_transformer

    pipe, snap = tiny_diffusers
    ours = load_flux_transformer(snap / "transformer", lora=LoRAConfig(rank=4, alpha=8.0))
    _randomize(ours, seed=1, scale=0.2)
    x = _inputs(channels=64, pooled=16, txt_dim=32)
    want = _ours(ours, x)
    base = _ours(load_flux_transformer(snap / "transformer"), x)
    path = save_peft_lora(ours, tmp_path / f"{fmt}.safetensors", alpha_format=fmt)
    pipe.load_lora_weights(str(path), adapter_name=f"ours_{fmt}")
    try:
        with torch.no_grad():
            got = pipe.transformer(hidden_states=torch.from_numpy(x["img"]), encoder_hidden_states=torch.from_numpy(x["txt"]),
                                   pooled_projections=torch.from_numpy(x["pooled"]),
                                   timestep=torch.from_numpy(x["timestep"]), img_ids=torch.from_numpy(x["img_ids"]),
                                   txt_ids=torch.from_numpy(x["txt_ids"]), guidance=torch.from_numpy(x["guidance"])
                                   ).sample.numpy()
    finally:
        pipe.unload_lora_weights()
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{fmt}: LoRA effect {np.abs(want - base).max():.2e}, diffusers vs ours max rel err {err:.2e}")
    assert np.abs(want - base).max() > 1e-2  # the adapters change the output
    assert err <= 1e-5


# ----------------------------------------------------------------------------- target names read from files


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    """``{dotted name: (in, out)}`` of every Linear of ``model``."""
    from arr_jax.nn.layers import Linear

    return {".".join(map(str, p)): (m.in_features, m.out_features) for p, m in nnx.iter_modules(model)
            if isinstance(m, Linear)}


def _write_peft_file(path, modules: dict[str, tuple[int, int, int]], seed=0, scale=0.1, prefix="transformer."):
    """A diffusers/PEFT LoRA file with random A (r, in) and B (out, r) for ``{name: (rank, in, out)}``."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (r, fan_in, fan_out) in modules.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = (scale * rng.standard_normal((r, fan_in))).astype(np.float32)
        tensors[f"{prefix}{name}.lora_B.weight"] = (scale * rng.standard_normal((fan_out, r))).astype(np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


FILE_TARGETS = ("transformer_blocks.1.attn.to_q", "proj_out")  # the file: a nested and a top-level name


def test_file_targets_are_exact_module_names(tmp_path):
    """A file with adapters on ``transformer_blocks.1.attn.to_q`` and the top-level ``proj_out`` loads into the
    model built from its own config with exactly those two modules adapted (as suffixes, ``proj_out`` would also
    hit every ``single_transformer_blocks.*.proj_out``, which the file has no weights for)."""
    shapes = _linear_shapes(_tiny(None))
    path = _write_peft_file(tmp_path / "two.safetensors", {n: (4, *shapes[n]) for n in FILE_TARGETS})
    cfg = lora_config_from_file(path)
    assert cfg.match == "exact" and set(cfg.targets) == set(FILE_TARGETS) and cfg.rank == 4
    model = _tiny(cfg)
    assert set(adapted_linears(model)) == set(FILE_TARGETS)
    assert load_peft_lora(model, path) == sorted(FILE_TARGETS)
    from safetensors.numpy import load_file

    stored = load_file(str(path))
    for name, lin in adapted_linears(model).items():
        np.testing.assert_array_equal(np.asarray(lin.lora_a.get_value()), stored[f"transformer.{name}.lora_A.weight"].T)
        np.testing.assert_allclose(np.asarray(lin.lora_b.get_value()) * lin.lora_scale,
                                   stored[f"transformer.{name}.lora_B.weight"].T, rtol=1e-6)
    # the same names as config suffixes mean something else: every module ending in them
    suffix = adapted_linears(_tiny(LoRAConfig(rank=4, alpha=4.0, targets=FILE_TARGETS)))
    assert set(suffix) == {*FILE_TARGETS, *(f"single_transformer_blocks.{i}.proj_out" for i in range(2))}


def test_every_module_named_in_a_file_and_only_those_is_adapted(tmp_path):
    """For several random subsets of the model's Linear layers (any depth, any kind), the model built from the
    file's config adapts exactly the file's modules and loads them all."""
    shapes = _linear_shapes(_tiny(None))
    names = sorted(shapes)
    rng = np.random.default_rng(0)
    for trial in range(4):
        chosen = sorted(rng.choice(names, size=int(rng.integers(1, 12)), replace=False).tolist())
        path = _write_peft_file(tmp_path / f"subset{trial}.safetensors", {n: (2, *shapes[n]) for n in chosen},
                                seed=trial)
        model = _tiny(lora_config_from_file(path))
        assert sorted(adapted_linears(model)) == chosen, trial
        assert load_peft_lora(model, path) == chosen


def test_file_naming_a_module_the_model_lacks_is_a_clear_error(tmp_path):
    path = _write_peft_file(tmp_path / "deep.safetensors", {"transformer_blocks.1.attn.to_q": (4, 32, 32),
                                                           "transformer_blocks.7.attn.to_q": (4, 32, 32)})
    with pytest.raises(ValueError, match=r"no Linear layer of the model: \['transformer_blocks\.7\.attn\.to_q'\]"):
        _tiny(lora_config_from_file(path))
    with pytest.raises(ValueError, match="match must be one of"):
        LoRAConfig(match="prefix")
    with pytest.raises(ValueError, match="got the string .attn.to_q."):
        LoRAConfig(targets="attn.to_q")


def test_kohya_file_is_a_clear_error(tmp_path):
    """kohya / sd-scripts names (lora_unet_*, lora_down / lora_up, alpha) are refused, naming the file and a key."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"lora_unet_double_blocks_0_img_attn_qkv.alpha": np.asarray(4.0, np.float32),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": rng.standard_normal((4, 32), np.float32),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": rng.standard_normal((96, 4), np.float32)}
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, str(path))
    for call in (lora_config_from_file, lambda p: load_peft_lora(_tiny(LoRAConfig(rank=4, alpha=4.0)), p)):
        with pytest.raises(ValueError, match=r"kohya\.safetensors: key 'lora_unet_double_blocks_0_img_attn_qkv\.alpha' "
                                             r"is a kohya / sd-scripts LoRA name"):
            call(path)


def test_mixed_rank_file_is_a_clear_error(tmp_path):
    """Modules of different ranks in one file: a ValueError naming the file, the ranks and a module of each."""
    shapes = _linear_shapes(_tiny(None))
    q = "transformer_blocks.0.attn.to_q"
    path = _write_peft_file(tmp_path / "mixed.safetensors", {q: (4, *shapes[q]), "proj_out": (8, *shapes["proj_out"])})
    with pytest.raises(ValueError, match=r"mixed\.safetensors: mixed ranks / scales are not supported.*"
                                         r"\{4: 'transformer_blocks\.0\.attn\.to_q', 8: 'proj_out'\}"):
        lora_config_from_file(path)


@pytest.mark.parity
def test_diffusers_adapts_the_same_modules_from_a_file(tmp_path):
    """diffusers (``FluxPipeline.load_lora_weights`` -> PEFT) adapts exactly the modules our model built from
    ``lora_config_from_file`` adapts, for the issue's file, and gives the same output with them."""
    pytest.importorskip("peft")
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from _tiny_flux import TRANSFORMER, _perturb
    from arr_jax.convert.flux import load_flux_transformer

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**dict(TRANSFORMER, num_layers=2, num_single_layers=2)).eval()
    _perturb(ref)
    ref.save_pretrained(tmp_path / "transformer")
    shapes = {n: (m.in_features, m.out_features) for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    path = _write_peft_file(tmp_path / "two.safetensors", {n: (4, *shapes[n]) for n in FILE_TARGETS}, scale=0.3)

    ours = load_flux_transformer(tmp_path / "transformer", lora=lora_config_from_file(path))
    load_peft_lora(ours, path)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=ref)
    x = _inputs(channels=64, pooled=16, txt_dim=32)
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in x.items()}
        base = ref(hidden_states=t["img"], encoder_hidden_states=t["txt"], pooled_projections=t["pooled"],
                   timestep=t["timestep"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=t["guidance"]).sample
        pipe.load_lora_weights(str(path), adapter_name="file")
        adapted = {n for n, m in ref.named_modules() if isinstance(m, BaseTunerLayer)}
        got = ref(hidden_states=t["img"], encoder_hidden_states=t["txt"], pooled_projections=t["pooled"],
                  timestep=t["timestep"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=t["guidance"]).sample
    assert adapted == set(FILE_TARGETS) == set(adapted_linears(ours))
    want = _ours(ours, x)
    assert np.abs(got.numpy() - base.numpy()).max() > 1e-2  # the adapters matter
    assert np.abs(got.numpy() - want).max() / np.abs(want).max() <= 1e-5


# ----------------------------------------------------------------------------- PEFT config fields (issue #19, kind 2)


@pytest.mark.parity
@pytest.mark.parametrize("rslora", [True, False])
def test_peft_file_with_use_rslora_loads_at_peft_strength(tmp_path, rslora):
    """b02: an adapter saved by PEFT + diffusers' save_lora_weights with its LoraConfig as metadata. With
    use_rslora the scale is alpha/sqrt(r) = 8/2 = 4 (not alpha/r = 2), and our output equals diffusers'."""
    pytest.importorskip("peft")
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    from _tiny_flux import TRANSFORMER, _perturb
    from arr_jax.convert.flux import load_flux_transformer

    torch.manual_seed(0)
    small = dict(TRANSFORMER, num_layers=1, num_single_layers=1)
    src = FluxTransformer2DModel(**small).eval()
    _perturb(src)
    src.save_pretrained(tmp_path / "transformer")
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["to_q", "to_k"])
    src.add_adapter(cfg)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))
    FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(src),
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    lc = lora_config_from_file(path)
    assert lc.scale == pytest.approx(4.0 if rslora else 2.0)
    ref = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=ref)
    pipe.load_lora_weights(str(path), adapter_name="rs")
    assert ref.transformer_blocks[0].attn.to_q.scaling["rs"] == pytest.approx(lc.scale)
    x = _inputs(channels=64, pooled=16, txt_dim=32)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        want = ref(hidden_states=t["img"], encoder_hidden_states=t["txt"], pooled_projections=t["pooled"],
                   timestep=t["timestep"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=t["guidance"]).sample.numpy()
    ours = load_flux_transformer(tmp_path / "transformer", lora=lc)
    load_peft_lora(ours, path)
    got = _ours(ours, x)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def _file_with_metadata(path, meta: dict, prefix="transformer."):
    """A one-module PEFT file (rank 4, to_q of block 0) whose lora_adapter_metadata is ``meta``."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    name = "transformer_blocks.0.attn.to_q"
    tensors = {f"{prefix}{name}.lora_A.weight": rng.standard_normal((4, 64)).astype(np.float32),
               f"{prefix}{name}.lora_B.weight": rng.standard_normal((64, 4)).astype(np.float32)}
    full = {f"{prefix}{k}": v for k, v in {"r": 4, "lora_alpha": 8, "target_modules": [name], **meta}.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(full)})
    return path


@pytest.mark.parametrize("field,value", [
    ("use_dora", True), ("rank_pattern", {"to_q": 8}), ("alpha_pattern", {"to_q": 16}), ("lora_bias", True),
    ("bias", "lora_only"), ("fan_in_fan_out", True), ("modules_to_save", ["proj_out"]),
    ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "olora"), ("layer_replication", [[0, 1]]),
    ("target_parameters", ["to_q.weight"]), ("use_qalora", True), ("trainable_token_indices", [1, 2]),
    ("some_future_field", 3)])
def test_peft_fields_that_change_the_maths_are_refused_by_name(tmp_path, field, value):
    path = _file_with_metadata(tmp_path / "a.safetensors", {field: value})
    with pytest.raises(ValueError, match=rf"{field}="):
        lora_config_from_file(path)
    with pytest.raises(ValueError, match=rf"{field}="):
        load_peft_lora(_tiny(LoRAConfig(rank=4, alpha=8.0, targets=("transformer_blocks.0.attn.to_q",),
                                        match="exact")), path)


def test_peft_default_config_fields_are_accepted(tmp_path):
    """Every field of a default PEFT LoraConfig (as diffusers stores it) is inert or at its default."""
    peft = pytest.importorskip("peft")
    meta = json.loads(json.dumps(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"]).to_dict(), default=str))
    path = _file_with_metadata(tmp_path / "d.safetensors", meta)
    assert lora_config_from_file(path).scale == pytest.approx(2.0)
    path = _file_with_metadata(tmp_path / "r.safetensors", {**meta, "use_rslora": True})
    assert lora_config_from_file(path).scale == pytest.approx(4.0)


def test_export_states_the_maths_fields_and_reimports(tmp_path):
    src = _tiny(LoRAConfig(rank=4, alpha=16.0))
    _randomize(src)
    _, meta = lora_state_dict(src, alpha_format="metadata")
    m = json.loads(meta["lora_adapter_metadata"])
    assert m["transformer.use_rslora"] is False and m["transformer.use_dora"] is False
    assert m["transformer.lora_bias"] is False and m["transformer.bias"] == "none"
    path = save_peft_lora(src, tmp_path / "m.safetensors", alpha_format="metadata")
    assert lora_config_from_file(path).scale == pytest.approx(4.0)
    try:
        from peft import LoraConfig
    except ImportError:
        return
    cfg = LoraConfig(**{k.removeprefix("transformer."): v for k, v in m.items()})
    assert cfg.use_rslora is False and cfg.r == 4 and cfg.lora_alpha == 16.0


def test_stacked_blocks_export_and_import_under_per_block_names(tmp_path):
    """A model with scanned blocks stores them stacked (`arr_jax.nn.stack`); its LoRA file is the per-block
    model's, byte for byte, and loads back into either layout with the same outputs."""
    from arr_jax.nn.stack import StackedBlocks

    lora = LoRAConfig(rank=2, alpha=4.0)
    flat = FluxTransformer(FluxConfig.tiny(lora=lora), rngs=nnx.Rngs(0))
    stacked = FluxTransformer(FluxConfig.tiny(lora=lora, scan_blocks=True), rngs=nnx.Rngs(0))
    assert isinstance(stacked.transformer_blocks, StackedBlocks)
    assert stacked.transformer_blocks.block.attn.to_q.kernel.get_value().shape[0] == 2
    assert sorted(adapted_linears(stacked)) == sorted(adapted_linears(flat))
    _randomize(flat, seed=3)
    save_peft_lora(flat, tmp_path / "flat.safetensors")
    load_peft_lora(stacked, tmp_path / "flat.safetensors")   # per-block names into the stacked rows
    save_peft_lora(stacked, tmp_path / "stacked.safetensors")
    a, b = lora_state_dict(flat)[0], lora_state_dict(stacked)[0]
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    x = _inputs()
    np.testing.assert_allclose(_ours(stacked, x), _ours(flat, x), rtol=1e-5, atol=1e-5)
