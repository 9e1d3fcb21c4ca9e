"""Flux transformer: parity with diffusers, checkpoint validation, sharded forward."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arr_jax.convert.flux import diffusers_key_to_ours, load_flux_transformer
from arr_jax.convert.safetensors_io import CheckpointFormatError
from arr_jax.models.flux import FluxConfig, FluxTransformer
from arr_jax.nn.lora import LoRAConfig
from arr_jax.sharding import make_mesh, make_rules

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
B, N, L = 4, 12, 5
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _inputs(guidance: bool):
    rng = np.random.default_rng(0)
    img_ids = np.stack(np.meshgrid(np.zeros(1), np.arange(3), np.arange(4), indexing="ij"), -1).reshape(N, 3)
    return dict(
        img=rng.standard_normal((B, N, 16), np.float32),
        txt=rng.standard_normal((B, L, 32), np.float32),
        pooled=rng.standard_normal((B, 16), np.float32),
        timestep=np.array([0.3, 0.9, 0.0, 1.0], np.float32),
        img_ids=img_ids.astype(np.float32),
        txt_ids=np.zeros((L, 3), np.float32),
        guidance=np.array([3.5, 1.0, 0.0, 7.0], np.float32) if guidance else None,
    )


def _ours(model, x):
    args = {k: (None if v is None else jnp.asarray(v)) for k, v in x.items()}
    return model(**args)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random diffusers Flux models (with / without guidance) saved to disk, plus their outputs."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    out = {}
    for guidance in (True, False):
        torch.manual_seed(0)
        model = diffusers.FluxTransformer2DModel(guidance_embeds=guidance, **TINY).eval()
        with torch.no_grad():  # make every init (norm scales, biases) generic
            for name, p in model.named_parameters():
                if p.ndim == 1 and "norm" in name:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                else:
                    p.add_(0.05 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(f"flux_g{int(guidance)}")
        model.save_pretrained(path)
        x = _inputs(guidance)
        with torch.no_grad():
            ref = model(hidden_states=torch.from_numpy(x["img"]), encoder_hidden_states=torch.from_numpy(x["txt"]),
                        pooled_projections=torch.from_numpy(x["pooled"]),
                        timestep=torch.from_numpy(x["timestep"]), img_ids=torch.from_numpy(x["img_ids"]),
                        txt_ids=torch.from_numpy(x["txt_ids"]),
                        guidance=None if x["guidance"] is None else torch.from_numpy(x["guidance"])).sample
        out[guidance] = (path, x, ref.numpy())
    return out


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [True, False])
def test_matches_diffusers(checkpoints, guidance):
    path, x, ref = checkpoints[guidance]
    model = load_flux_transformer(path)
    assert model.config.guidance_embeds is guidance
    out = np.asarray(_ours(model, x))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(f"guidance={guidance}: rel err {rel:.2e}, max abs err {np.abs(out - ref).max():.2e}")
    assert out.shape == ref.shape == (B, N, 16)
    assert rel <= 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("mode", [dict(scan_blocks=True), dict(scan_blocks=True, remat="dots"), dict(remat="full")],
                         ids=["scan", "scan+remat_dots", "loop+remat_full"])
def test_block_execution_modes_match_diffusers(checkpoints, mode):
    """Scanned blocks (stacked weights, one lax.scan) and remat policies compute diffusers' output."""
    from arr_jax.nn.stack import StackedBlocks

    path, x, ref = checkpoints[True]
    model = load_flux_transformer(path, **mode)
    # scanned blocks are stored stacked, loaded straight into that layout from diffusers' per-block names
    assert isinstance(model.transformer_blocks, StackedBlocks) == mode.get("scan_blocks", False)
    out = np.asarray(_ours(model, x))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= 1e-5, rel


@pytest.mark.parity
def test_scanned_blocks_lora_gradients_match_loop(checkpoints):
    """The LoRA gradient through scanned, rematerialised blocks equals the plain loop's."""
    from arr_jax.nn.lora import LoRAParam

    path, x, _ = checkpoints[True]
    lora = LoRAConfig(rank=2, alpha=4.0)
    args = {k: jnp.asarray(v) for k, v in x.items()}
    grads = {}
    for name, mode in (("loop", {}), ("scan_full", dict(scan_blocks=True, remat=True)),
                       ("scan_dots", dict(scan_blocks=True, remat="dots"))):
        model = load_flux_transformer(path, lora=lora, lora_seed=0, **mode)
        graphdef, tr, rest = nnx.split(model, LoRAParam, ...)
        tr = jax.tree.map(lambda a: a + 0.1, tr)  # nonzero B, so both adapters get gradients

        def loss(tr):
            return jnp.sum(jnp.square(nnx.merge(graphdef, tr, rest)(**args)))

        grads[name] = _per_block(jax.jit(jax.grad(loss))(tr))
    assert len(grads["loop"]) > 0
    for name in ("scan_full", "scan_dots"):
        assert sorted(grads[name]) == sorted(grads["loop"])  # stacked storage, diffusers' per-block names
        for key, a in grads["loop"].items():  # float32 reassociation only: 1e-5 of the gradient's scale
            a, b = np.asarray(a), np.asarray(grads[name][key])
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


def _per_block(state) -> dict:
    """``{dotted per-block name: array}``: rows of stacked block groups (``transformer_blocks.block.x``)
    under their diffusers names (``transformer_blocks.<i>.x``)."""
    from arr_jax.nn.stack import STACK

    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if STACK in names:
            p = names.index(STACK)
            for i in range(x.shape[0]):
                out[".".join(names[:p] + [str(i)] + names[p + 1:])] = x[i]
        else:
            out[".".join(names)] = x
    return out


@pytest.mark.parity
def test_bad_remat_mode_is_named():
    with pytest.raises(ValueError, match="remat"):
        FluxConfig.tiny(remat="sometimes")


@pytest.mark.parity
def test_guidance_argument_checked(checkpoints):
    path, x, _ = checkpoints[True]
    model = load_flux_transformer(path)
    with pytest.raises(ValueError, match="guidance"):
        _ours(model, dict(x, guidance=None))


def _rewrite(src, dst, edit):
    """Copy a checkpoint dir, editing its tensors dict with ``edit``."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS))


@pytest.mark.parity
@pytest.mark.parametrize("case", ["missing", "shape", "unused"])
def test_bad_checkpoint_names_the_key(checkpoints, tmp_path, case):
    src = checkpoints[False][0]
    key = "transformer_blocks.1.attn.add_k_proj.weight"

    def edit(t):
        if case == "missing":
            del t[key]
        elif case == "shape":
            t[key] = t[key][:, :-1].copy()
        else:
            t["transformer_blocks.1.attn.extra.weight"] = np.zeros((2, 2), np.float32)

    _rewrite(src, tmp_path / "bad", edit)
    expect = {"missing": "transformer_blocks.1.attn.add_k_proj.kernel", "shape": key,
              "unused": "transformer_blocks.1.attn.extra.weight"}[case]
    with pytest.raises(CheckpointFormatError, match=expect.replace(".", r"\.")):
        load_flux_transformer(tmp_path / "bad")


@pytest.mark.parity
def test_guidance_checkpoint_into_plain_config_fails(checkpoints, tmp_path):
    """A config that disagrees with the weights (guidance_embedder present) is rejected."""
    src = checkpoints[True][0]
    dst = tmp_path / "mismatch"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["guidance_embeds"] = False
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match="guidance_embedder"):
        load_flux_transformer(dst)


def test_key_map():
    path, tr = diffusers_key_to_ours("transformer_blocks.3.attn.to_out.0.weight")
    assert path == ("transformer_blocks", 3, "attn", "to_out", 0, "kernel")
    assert tr(np.zeros((2, 3))).shape == (3, 2)
    assert diffusers_key_to_ours("single_transformer_blocks.0.attn.norm_k.weight") == (
        ("single_transformer_blocks", 0, "attn", "norm_k", "weight"), None)
    assert diffusers_key_to_ours("transformer_blocks.0.ff.net.0.proj.bias")[0] == (
        "transformer_blocks", 0, "ff", "net", 0, "proj", "bias")


def test_model_paths_cover_diffusers_names():
    """Our parameter paths are exactly the mapped diffusers names (checked without torch)."""
    from arr_jax.convert.safetensors_io import flat_params

    model = nnx.eval_shape(lambda: FluxTransformer(FluxConfig.tiny(), rngs=nnx.Rngs(0)))
    ours = set(flat_params(nnx.state(model, nnx.Param)))
    for name in ["time_text_embed.guidance_embedder.linear_1.kernel", "context_embedder.kernel",
                 "x_embedder.bias", "transformer_blocks.1.norm1_context.linear.kernel",
                 "transformer_blocks.0.attn.norm_added_q.weight", "transformer_blocks.0.ff_context.net.2.kernel",
                 "single_transformer_blocks.1.proj_mlp.kernel", "single_transformer_blocks.1.norm.linear.bias",
                 "norm_out.linear.kernel", "proj_out.kernel", "time_text_embed.text_embedder.linear_2.bias"]:
        assert name in ours, name
    for v in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata().get("axes")
        assert axes is not None and len(axes) == len(v.get_value().shape)


@pytest.mark.parity
def test_sharded_forward_matches_unsharded(checkpoints):
    path, x, ref = checkpoints[True]
    plain = load_flux_transformer(path)
    expect = np.asarray(_ours(plain, x))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rules = make_rules(mesh)
    model = load_flux_transformer(path, rules=rules, lora=LoRAConfig(rank=2, alpha=2.0))  # fresh: B = 0
    to_q = model.transformer_blocks[0].attn.to_q
    assert to_q.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert to_q.lora_a.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    graphdef, state = nnx.split(model)
    batch = rules.sharding(("batch", None, None))
    args = {k: jax.device_put(jnp.asarray(v), rules.sharding(("batch",) + (None,) * (v.ndim - 1)))
            if k not in ("img_ids", "txt_ids") else jnp.asarray(v) for k, v in x.items()}

    @jax.jit
    def forward(state, args):
        return nnx.merge(graphdef, state)(**args)

    out = forward(state, args).block_until_ready()
    assert out.sharding.spec[0] == batch.spec[0]
    np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) <= 1e-5


# ----------------------------------------------------------------------------- timestep / guidance embedding

# The Flux inputs where a frequency's last bit shows: guidance 3.5 and sigma 0.9 enter as 3500 and 900.
EMBED_ARGS = np.array([3.5, 0.9], np.float32) * np.float32(1000.0)


class _TorchExp:
    """Wraps ``torch.exp`` while active: records each call's (input, output) and, with ``exact=True``,
    returns float32 results rounded once from float64 (torch's CPU float32 exp is off by an ulp for a few
    arguments, e.g. 2 of Flux's 128 frequency exponents, by 0.52 ulp)."""

    def __init__(self, monkeypatch, exact: bool):
        import torch

        self.calls, real = [], torch.exp

        def exp(x, *a, **kw):
            y = real(x.double()).to(x.dtype) if exact and x.dtype == torch.float32 else real(x, *a, **kw)
            self.calls.append((x.detach().numpy().copy(), y.detach().numpy().copy()))
            return y

        monkeypatch.setattr(torch, "exp", exp)


@pytest.mark.parity
def test_timestep_frequencies_follow_diffusers_exponent_and_round_once(monkeypatch):
    """Our table is diffusers' float32 exponent, exponentiated in float64 and rounded once; it is within one
    ulp of torch's own float32 table (and equal where torch's exp is correctly rounded)."""
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    from arr_jax.nn.layers import timestep_frequencies

    for half, shift in ((128, 0), (128, 1), (160, 1)):
        rec = _TorchExp(monkeypatch, exact=False)
        get_timestep_embedding(torch.from_numpy(EMBED_ARGS), 2 * half, downscale_freq_shift=shift)
        (exponent, torch_table), = rec.calls
        ours = timestep_frequencies(half, shift)
        assert ours.dtype == np.float32 and ours.shape == (half,) and not ours.flags.writeable
        np.testing.assert_array_equal(ours, np.exp(exponent.astype(np.float64)).astype(np.float32))
        ulps = np.abs(ours.view(np.int32).astype(np.int64) - torch_table.view(np.int32))
        # torch's vectorised float32 exp is off by one ulp in a few entries (2 or 3 of 128, by CPU kernel)
        assert ulps.max() <= 1 and (ulps > 0).sum() <= 4, (half, shift, np.flatnonzero(ulps))
        monkeypatch.undo()


@pytest.mark.parity
def test_timestep_embedding_matches_diffusers_at_guidance_and_late_sigma(monkeypatch):
    """``timestep_embedding`` at 3500 (guidance 3.5) and 900 (sigma 0.9) against diffusers'
    ``get_timestep_embedding``: to 1e-6 with diffusers' exp correctly rounded, and within the effect of
    torch's own one-ulp exp errors (``t * ulp(freq)``) without."""
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    from arr_jax.nn.layers import timestep_embedding

    ours = np.asarray(timestep_embedding(jnp.asarray(EMBED_ARGS), 256))
    _TorchExp(monkeypatch, exact=True)
    flux_kw = dict(flip_sin_to_cos=True, downscale_freq_shift=0)  # diffusers' Flux `Timesteps`
    exact = get_timestep_embedding(torch.from_numpy(EMBED_ARGS), 256, **flux_kw).numpy()
    monkeypatch.undo()
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-6)
    plain = get_timestep_embedding(torch.from_numpy(EMBED_ARGS), 256, **flux_kw).numpy()
    for row in (0, 1):  # torch's plain exp: within t * ulp of a frequency <= 1 (f32), its one-ulp entries
        bound = 1e-6 + EMBED_ARGS[row] * np.spacing(np.float32(1.0))
        assert np.abs(ours[row] - plain[row]).max() <= bound


@pytest.mark.parity
def test_time_text_embed_matches_diffusers_with_nontrivial_weights(checkpoints, monkeypatch):
    """Flux's ``CombinedTimestepGuidanceTextProjEmbeddings`` (perturbed random weights) at t = 0.9 and
    guidance 3.5 (inputs x1000, as the transformer passes them) against our `TimeTextEmbed`."""
    import torch
    from diffusers import FluxTransformer2DModel

    path = checkpoints[True][0]
    ref = FluxTransformer2DModel.from_pretrained(path).eval().time_text_embed
    ours = load_flux_transformer(path).time_text_embed
    rng = np.random.default_rng(1)
    pooled = rng.standard_normal((2, 16), np.float32)
    t = np.float32(1000.0) * np.array([0.9, 0.9], np.float32)
    g = np.float32(1000.0) * np.array([3.5, 1.0], np.float32)
    got = np.asarray(jax.jit(lambda a, b, c: ours(a, b, c))(jnp.asarray(t), jnp.asarray(g), jnp.asarray(pooled)))
    _TorchExp(monkeypatch, exact=True)
    with torch.no_grad():
        want = ref(torch.from_numpy(t), torch.from_numpy(g), torch.from_numpy(pooled)).numpy()
    monkeypatch.undo()
    scale = np.abs(want).max()
    print(f"time_text_embed: max abs err {np.abs(got - want).max():.2e} (output scale {scale:.2f})")
    assert scale > 0.1 and np.abs(got - want).max() <= 1e-6 * max(1.0, scale)
