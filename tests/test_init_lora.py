"""``rpo.init_lora``: RPO starting from a diffusers / PEFT LoRA file. Iteration-0 samples equal sampling
with the file (world policy and tiny FLUX, per-block and stacked layouts, another alpha), files of
another rank or target set are refused by name, the run records the file, and resume restores the
checkpoint, not the file."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_tiny_policy
from flax import nnx

from arr_jax.convert.lora_peft import save_peft_lora
from arr_jax.nn.lora import DEFAULT_TARGETS, LoRAParam
from arr_jax.policies.base import as_items
from arr_jax.rpo.init_lora import file_sha256, load_init_lora
from arr_jax.rpo.trainer import RPOSettings, RPOTrainer
from arr_jax.world.judge import WorldJudge

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["two red circles on the left", "one blue square on the top"]


def _perturb(model, seed: int, scale: float = 0.3) -> None:
    """Nonzero, generic adapters (a fresh LoRA has B = 0 and computes the base model)."""
    state = nnx.state(model, LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                                for x, k in zip(leaves, keys)]))


def _rpo(**kw):
    d = dict(lora_rank=2, lora_alpha=4.0, lora_targets=DEFAULT_TARGETS, full_finetune=False)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def _trainer(policy, reference="base"):
    s = RPOSettings(pairs_per_batch=2, micro_batch=4, num_steps=4, learning_rate=1e-2, eta=0.7)
    return RPOTrainer(policy, WorldJudge(), s, trainable="lora", reference=reference)


def _edit(src: Path, dst: Path, fn) -> Path:
    """A copy of LoRA file ``src`` with its tensors changed by ``fn(dict) -> dict``."""
    from safetensors.numpy import load_file, save_file

    save_file(fn(dict(load_file(str(src)))), str(dst))
    return dst


def _rank4(t):
    out = {}
    for k, v in t.items():
        pad = [(0, 2), (0, 0)] if ".lora_A." in k else [(0, 0), (0, 2)]
        out[k] = np.pad(v, pad)
    return out


@pytest.fixture(scope="module")
def world_lora(tmp_path_factory):
    """A world policy with trained-looking adapters and its export (bake: B scaled, so the file's alpha/r
    is 1 and loading rescales it to the run's 2)."""
    d = tmp_path_factory.mktemp("world_lora")
    src = make_tiny_policy(seed=0)
    _perturb(src.model, 1)
    path = save_peft_lora(src.model, d / "adapter.safetensors", metadata={"note": "test"})
    return src, path


def test_world_iteration_zero_equals_the_file(world_lora):
    src, path = world_lora
    ref = _trainer(src)
    policy = make_tiny_policy(seed=0)  # same base, fresh adapters
    info = load_init_lora(policy.model, path, _rpo())
    assert info["sha256"] == file_sha256(path) and info["rank"] == 2 and info["alpha"] == 2.0  # baked: alpha = r
    tr = _trainer(policy, reference="init")
    seeds = [3, 4]
    for sampler in ("ode", "sde"):
        ours = tr.generate(PROMPTS, seeds, sampler=sampler)
        assert np.array_equal(ours, ref.generate(PROMPTS, seeds, sampler=sampler)), sampler
    x = jnp.asarray(np.stack([np.asarray(jax.random.normal(jax.random.key(s), tr.latent_shape)) for s in [3, 4, 5, 6]]))
    cond = tr._conditioning(as_items(PROMPTS * 2), 1)
    a = tr.programs.ode(tr.trainable, tr.frozen, cond, x, tr.sigmas)
    b = ref.programs.ode(ref.trainable, ref.frozen, cond, x, ref.sigmas)
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5
    # the reference is the initial LoRA (reference="init"), not the base
    assert np.array_equal(tr.generate(PROMPTS, seeds, use_reference=True), tr.generate(PROMPTS, seeds))
    base = _trainer(make_tiny_policy(seed=0))
    assert not np.array_equal(base.generate(PROMPTS, seeds, sampler="ode"), tr.generate(PROMPTS, seeds, sampler="ode"))


def test_world_other_rank_or_targets_are_refused_by_name(world_lora, tmp_path):
    _, path = world_lora
    policy = make_tiny_policy(seed=0)
    before = jax.tree.map(np.asarray, nnx.state(policy.model, LoRAParam))
    r4 = _edit(path, tmp_path / "r4.safetensors", _rank4)
    with pytest.raises(ValueError, match=r"rpo.init_lora: .*r4.safetensors has LoRA rank 4 but rpo.lora_rank=2; "
                                         r"pass --config.rpo.lora_rank=4"):
        load_init_lora(policy.model, r4, _rpo())
    no_k = _edit(path, tmp_path / "no_k.safetensors", lambda t: {k: v for k, v in t.items() if ".attn.to_k." not in k})
    with pytest.raises(ValueError, match=r"lacks modules the run adapts \(targets attn.to_k; e.g. "
                                         r"single_transformer_blocks.0.attn.to_k\).*rpo.lora_targets"):
        load_init_lora(policy.model, no_k, _rpo())

    def extra(t):
        t = dict(t)
        t["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"] = np.zeros((2, 16), np.float32)
        t["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"] = np.zeros((64, 2), np.float32)
        return t

    with pytest.raises(ValueError, match=r"adapts modules the run does not \(targets proj_mlp; "
                                         r"e.g. single_transformer_blocks.0.proj_mlp\)"):
        load_init_lora(policy.model, _edit(path, tmp_path / "extra.safetensors", extra), _rpo())
    with pytest.raises(FileNotFoundError, match="rpo.init_lora: .*missing.safetensors does not exist"):
        load_init_lora(policy.model, tmp_path / "missing.safetensors", _rpo())
    with pytest.raises(ValueError, match="rpo.full_finetune=True"):
        load_init_lora(policy.model, path, _rpo(full_finetune=True))
    after = jax.tree.map(np.asarray, nnx.state(policy.model, LoRAParam))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))  # untouched


def test_resume_restores_the_checkpoint_not_the_file(world_lora, tmp_path):
    from arr_jax.checkpoint import Checkpointer
    from arr_jax.rpo.run import restore_checkpoint, save_checkpoint

    _, path = world_lora
    policy = make_tiny_policy(seed=0)
    load_init_lora(policy.model, path, _rpo())
    tr = _trainer(policy, reference="init")
    init = jax.tree.map(np.asarray, tr.trainable)
    tr.trainable = jax.tree.map(lambda x: x + 0.01, tr.trainable)  # "trained" after the file
    tr.iteration = 3
    saved = jax.tree.map(np.asarray, tr.trainable)
    ck = Checkpointer(tmp_path / "ck", max_to_keep=1)
    save_checkpoint(ck, tr, [])
    ck.wait()

    fresh = make_tiny_policy(seed=0)
    load_init_lora(fresh.model, path, _rpo())
    tr2 = _trainer(fresh, reference="init")
    restore_checkpoint(Checkpointer(tmp_path / "ck", max_to_keep=1), tr2)
    assert tr2.iteration == 3
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(tr2.trainable)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(tr2.ref_trainable)):  # the reference: the file's
        np.testing.assert_array_equal(a, np.asarray(b))


# ------------------------------------------------------------------------------ tiny FLUX, through build_run

@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny FLUX snapshot and a LoRA on its attention, written in diffusers' metadata layout with alpha 8
    (the run's is 4: loading rescales B), from the per-block layout."""
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "configs"))
    import flux_dev_t2i

    from _tiny_flux import build_tiny_pipeline
    from arr_jax.nn.lora import LoRAConfig
    from arr_jax.policies.flux import load_pipeline

    d = tmp_path_factory.mktemp("init_lora_flux")
    build_tiny_pipeline(d / "flux")
    (d / "prompts.txt").write_text("a red cat\na blue dog\n")
    cfg = flux_dev_t2i.get_config("tiny")
    cfg.model_dir = str(d / "flux")
    cfg.prompts_file = str(d / "prompts.txt")
    cfg.workdir = str(d / "run")
    cfg.judge.kind = "world_programmatic"  # builds in no time; nothing is judged here
    cfg.judge.rubric = ""
    cfg.rpo.eval_every = 0
    pipe = load_pipeline(cfg, None, LoRAConfig(rank=2, alpha=8.0, targets=tuple(cfg.rpo.lora_targets)))
    _perturb(pipe.transformer, 2, scale=0.5)
    path = save_peft_lora(pipe.transformer, d / "third_party.safetensors", alpha_format="metadata")
    return cfg, path


def test_flux_iteration_zero_equals_sampling_with_the_file(flux, tmp_path):
    """The run (stacked blocks, ``flux.scan_blocks=True``) at iteration 0 samples what `arr_jax.sample` samples
    with ``lora_path`` = the file (per-block layout)."""
    from _tiny_flux import IMAGE

    from arr_jax.convert.lora_peft import read_run_metadata
    from arr_jax.rpo.run import build_run, export_lora, run_metadata
    from arr_jax.sample import build_pipeline

    cfg, path = flux
    cfg = cfg.copy_and_resolve_references()
    cfg.flux.scan_blocks = True
    cfg.rpo.init_lora = str(path)
    cfg.workdir = str(tmp_path / "run")
    run = build_run(cfg)
    assert run.trainer.reference == "init"
    meta = run_metadata(run)["init_lora"]
    assert meta["sha256"] == file_sha256(path) and meta["alpha"] == 8.0 and meta["rank"] == 2
    assert meta["modules"] == 8 + 3 and meta["reference"] == "init"  # 8 in the double block, q/k/v in the single

    scfg = cfg.copy_and_resolve_references()
    scfg.rpo.init_lora = ""
    scfg.lora_path = str(path)
    scfg.flux.scan_blocks = False
    file_pipe = build_pipeline(scfg)
    ours_pipe = run.policy.info["pipeline"]
    lat = np.asarray(file_pipe.noise([5, 6], file_pipe.latent_space(IMAGE, IMAGE)))
    kw = dict(height=IMAGE, width=IMAGE, num_steps=2, guidance=3.5, latents=lat)
    want = file_pipe.sample(["a red cat", "a blue dog"], **kw).images
    got = ours_pipe.sample(["a red cat", "a blue dog"], **kw).images
    assert np.abs(got - want).max() <= 1e-5
    base = build_pipeline(_no_lora(scfg))
    assert np.abs(base.sample(["a red cat", "a blue dog"], **kw).images - want).max() > 1e-3  # the LoRA matters

    out = export_lora(run, "step_0", 0)  # the run's LoRA files record where they started
    assert read_run_metadata(out)["init_lora"]["sha256"] == file_sha256(path)


def _no_lora(cfg):
    c = cfg.copy_and_resolve_references()
    c.lora_path = ""
    return c


def test_flux_other_rank_is_refused_before_loading(flux, tmp_path):
    from arr_jax.rpo.run import build_run

    cfg, path = flux
    cfg = cfg.copy_and_resolve_references()
    cfg.rpo.init_lora = str(path)
    cfg.rpo.lora_rank = 4
    cfg.model_dir = str(tmp_path / "nowhere")  # never reached: the file is checked first
    with pytest.raises(ValueError, match=r"third_party.safetensors has LoRA rank 2 but rpo.lora_rank=4"):
        build_run(cfg)
    cfg.rpo.lora_rank = 2
    cfg.rpo.lora_targets = ("attn.to_q", "attn.to_k")
    cfg.model_dir = flux[0].model_dir
    with pytest.raises(ValueError, match=r"adapts modules the run does not \(targets attn.add_k_proj, "
                                         r"attn.add_q_proj, attn.add_v_proj, attn.to_add_out \.\.\."):
        build_run(cfg)


def test_demo_config_starts_from_its_own_export(tmp_path):
    """The world demo's config (shipped base, its LoRA targets and rank): a run's exported LoRA given as
    ``rpo.init_lora`` to a new run gives the same iteration-0 samples, and a file of the FLUX tiny rank is
    refused by the demo's key."""
    sys.path.insert(0, str(ROOT / "configs"))
    import demo as demo_config

    from arr_jax.rpo.run import build_run, export_lora, run_metadata

    def config(**rpo):
        c = demo_config.get_config("tiny")
        c.workdir = str(tmp_path / "run")
        c.judge.kind, c.judge.rubric = "world_programmatic", ""
        c.rpo.eval_every = 0
        c.rpo.update(rpo)
        return c

    first = build_run(config())
    _perturb(first.policy.model, 4, scale=0.2)
    path = export_lora(first, "exported", 0)
    second = build_run(config(init_lora=str(path), init_lora_reference="base"))
    assert run_metadata(second)["init_lora"]["sha256"] == file_sha256(path)
    assert second.trainer.reference == "base"
    prompts, seeds = ["two red circles on the left"] * 2 + ["one blue square on the top"] * 2, [1, 2, 3, 4]
    want = first.trainer.generate(prompts, seeds, sampler="ode")
    assert np.array_equal(second.trainer.generate(prompts, seeds, sampler="ode"), want)
    assert not np.array_equal(second.trainer.generate(prompts, seeds, sampler="ode", use_reference=True), want)
    with pytest.raises(ValueError, match=r"has LoRA rank 8 but rpo.lora_rank=2; pass --config.rpo.lora_rank=8"):
        build_run(config(init_lora=str(path), lora_rank=2))


def test_resume_signature_without_init_lora_is_unchanged():
    """Runs checkpointed before ``rpo.init_lora`` existed resume: the unset keys are not in the signature."""
    import types

    sys.path.insert(0, str(ROOT / "configs"))
    import demo as demo_config

    from arr_jax.rpo.run import resume_signature

    cfg = demo_config.get_config("tiny")
    fake = types.SimpleNamespace(cfg=cfg, train_prompts=[], policy=types.SimpleNamespace(identity={}),
                                 judge=types.SimpleNamespace(identity={}))
    assert not {"init_lora", "init_lora_reference"} & set(resume_signature(fake)["rpo"])
    cfg.rpo.init_lora = "a.safetensors"
    assert resume_signature(fake)["rpo"]["init_lora"] == "a.safetensors"
    assert resume_signature(fake)["rpo"]["init_lora_reference"] == "init"
