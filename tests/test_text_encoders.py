"""Parity of our T5 encoder and CLIP text model with tiny random transformers models (float32)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arr_jax.convert.clip_text import load_clip_text
from arr_jax.convert.t5 import load_t5_encoder
from arr_jax.models.t5 import relative_position_buckets
from arr_jax.sharding import make_mesh, make_rules

pytestmark = pytest.mark.parity


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _perturb_norms(model):
    """Random init leaves norm weights at one; perturb them so the test sees them."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def _forward(model, *args):
    """Jitted forward through the split/merge pattern the rollout uses."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)


# ----------------------------------------------------------------------------- T5

T5_CFG = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
              relative_attention_num_buckets=16, relative_attention_max_distance=20,
              feed_forward_proj="gated-gelu", dropout_rate=0.0)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    ref = T5EncoderModel(T5Config(**T5_CFG)).eval()
    _perturb_norms(ref)
    path = tmp_path_factory.mktemp("t5")
    ref.save_pretrained(path)
    return ref, path


def _t5_ids(batch=4, seq=32, pad=0):
    """Prompts of different lengths padded to ``seq`` (FLUX pads T5 to max_length), and the mask."""
    rng = np.random.default_rng(0)
    ids = np.full((batch, seq), pad, np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for i, n in enumerate(np.linspace(5, seq, batch).astype(int)):
        ids[i, :n - 1] = rng.integers(2, T5_CFG["vocab_size"], n - 1)
        ids[i, n - 1] = 1  # </s>
        mask[i, :n] = 1
    return ids, mask


def test_t5_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    import torch

    rel = torch.arange(512)[None, :] - torch.arange(512)[:, None]
    for nb, md in ((32, 128), (16, 20)):
        ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
        np.testing.assert_array_equal(relative_position_buckets(512, 512, nb, md), ref.numpy())


def test_t5_parity(tiny_t5):
    import torch

    ref, path = tiny_t5
    model = load_t5_encoder(path, jnp.float32)
    ids, mask = _t5_ids()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()  # as FluxPipeline: no mask
        want_masked = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    got = _forward(model, jnp.asarray(ids, jnp.int32))
    got_masked = _forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    err, err_masked = _rel(got, want), _rel(got_masked, want_masked)
    print(f"T5 last hidden rel err {err:.2e} (no mask), {err_masked:.2e} (mask)")
    assert got.shape == (4, 32, 32)
    assert err < 1e-5 and err_masked < 1e-5
    assert _rel(got_masked, want) > 1e-3  # the mask matters, so the masked comparison is meaningful


def test_t5_sharded_equals_unsharded(tiny_t5):
    _, path = tiny_t5
    ids, _ = _t5_ids()
    plain = np.asarray(_forward(load_t5_encoder(path), jnp.asarray(ids, jnp.int32)))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rules = make_rules(mesh)
    model = load_t5_encoder(path, rules=rules)
    q = model.encoder.block[0].layer[0].SelfAttention.q.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.asarray(ids, jnp.int32), rules.sharding(("batch", None)))
        out = jax.block_until_ready(_forward(model, x))
    assert out.sharding.spec[0] == ("data", "fsdp")
    err = _rel(out, plain)
    print(f"T5 sharded vs unsharded rel err {err:.2e}")
    assert err < 1e-5


def test_t5_loader_errors(tiny_t5, tmp_path):
    _, path = tiny_t5
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_t5_encoder(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="umt5")))
    with pytest.raises(ValueError, match="umt5"):
        load_t5_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_layers=3)))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"encoder\.block\.2"):
        load_t5_encoder(tmp_path)


# ----------------------------------------------------------------------------- CLIP

CLIP_CFG = dict(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=24, layer_norm_eps=1e-5, bos_token_id=78)


def _clip_ids(eos, pad, batch=3, seq=24):
    rng = np.random.default_rng(1)
    ids = np.full((batch, seq), pad, np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for i, n in enumerate((5, 13, seq)):
        ids[i, 0] = 78  # <|startoftext|>
        ids[i, 1:n - 1] = rng.integers(4, 78, n - 2)
        ids[i, n - 1] = eos
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("variant", ["flux", "new_eos"])
def test_clip_text_parity(variant, tmp_path):
    """``flux``: quick_gelu, legacy eos_token_id=2 (argmax rule), EOS padding, no mask (FluxPipeline).
    ``new_eos``: gelu, eos_token_id=3 (first-EOS rule; argmax would pick <|startoftext|>), pad 0, with a mask."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel as TorchCLIP

    if variant == "flux":
        cfg = dict(CLIP_CFG, hidden_act="quick_gelu", eos_token_id=2, pad_token_id=1)
        ids, mask = _clip_ids(eos=79, pad=79)
        mask = None
    else:
        cfg = dict(CLIP_CFG, hidden_act="gelu", eos_token_id=3, pad_token_id=0)
        ids, mask = _clip_ids(eos=3, pad=0)
    torch.manual_seed(0)
    ref = TorchCLIP(CLIPTextConfig(**cfg)).eval()
    _perturb_norms(ref)
    ref.save_pretrained(tmp_path)

    model = load_clip_text(tmp_path, jnp.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask))
    args = (jnp.asarray(ids, jnp.int32),) + (() if mask is None else (jnp.asarray(mask),))
    hidden, pooled = _forward(model, *args)
    err_h = _rel(hidden, out.last_hidden_state.numpy())
    err_p = _rel(pooled, out.pooler_output.numpy())
    print(f"CLIP[{variant}] last hidden rel err {err_h:.2e}, pooled {err_p:.2e}")
    assert pooled.shape == (3, 32)
    assert err_h < 1e-5 and err_p < 1e-5
    np.testing.assert_array_equal(model.eos_positions(jnp.asarray(ids)), [4, 12, 23])

    if variant == "flux":  # FLUX's text_encoder/ was saved by transformers 4: "text_model." keys + position_ids
        from safetensors.numpy import load_file, save_file

        old = {"text_model." + k: v for k, v in load_file(tmp_path / "model.safetensors").items()}
        old["text_model.embeddings.position_ids"] = np.arange(24, dtype=np.int64)[None]
        save_file(old, tmp_path / "model.safetensors")
        _, pooled_old = _forward(load_clip_text(tmp_path), *args)
        np.testing.assert_array_equal(pooled_old, pooled)


def test_clip_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip_text(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {}}))
    with pytest.raises(ValueError, match="clip_text_model"):
        load_clip_text(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(CLIP_CFG, model_type="clip_text_model")))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_clip_text(tmp_path)
