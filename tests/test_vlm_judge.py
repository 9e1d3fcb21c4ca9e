"""The Flax Qwen3-VL judge backend end to end on CPU: a tiny RANDOM Qwen3-VL snapshot (with a small
BPE tokenizer trained here on the prompt templates, holding the Qwen special tokens) runs ARR
induction and evaluation through the real entry points (its junk answers become parse failures,
never exceptions), and the one-prefill pairwise path gives consistent probabilities.

Also holds the snapshot helper `judge_snapshot` used by ``test_qwen3_vl_limits.py``.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>",
           "<|endoftext|>"]
PATCH, TPATCH, MERGE = 8, 2, 2
PREPROC = {"patch_size": PATCH, "temporal_patch_size": TPATCH, "merge_size": MERGE,
           "size": {"shortest_edge": 32 * 32, "longest_edge": 32 * 32},   # a 32^2 world image = 4 tokens
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
MAX_POS = 2048
NEW = 16


def corpus() -> list[str]:
    """Text the tokenizer learns from: the prompt templates, task descriptions, world prompts."""
    from arr_jax.judge.templates import PROMPTS_DIR, TASK_DESCRIPTIONS
    from arr_jax.world import spec

    texts = [p.read_text() for p in sorted(PROMPTS_DIR.glob("*.txt"))] + list(TASK_DESCRIPTIONS.values())
    texts += [p.text for p in spec.ALL_PROMPTS[:200]]
    texts += ["Judge according to this rubric", "Theme 1: Prompt alignment", '{"rank": [1, 2], "reason": "',
              "system user assistant Image BASE Image 1 Image 2"]
    return texts * 2


@functools.lru_cache(maxsize=None)
def judge_snapshot() -> str:
    """A tiny random HF Qwen3-VL saved with ``tokenizer.json`` and ``preprocessor_config.json``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    image = tok.get_vocab_size()
    tok.add_special_tokens(SPECIAL)
    assert tok.token_to_id("<|image_pad|>") == image
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=image + len(SPECIAL) + 1, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=MAX_POS,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=TPATCH, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=image, video_token_id=image + 1, vision_start_token_id=image + 2,
        vision_end_token_id=image + 3, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))   # peaky logits: varied junk rather than one repeated token
    d = Path(tempfile.mkdtemp(prefix="tiny_qwen3_vl_judge_"))
    model.save_pretrained(str(d))
    tok.save(str(d / "tokenizer.json"))
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROC))
    return str(d)


@functools.lru_cache(maxsize=None)
def backend(**kw):
    from arr_jax.judge.vlm_backend import FlaxVLMBackend

    kw = dict(dict(max_new_tokens=NEW, batch_size=8, seq_bucket=128), **kw)
    return FlaxVLMBackend.from_snapshot(judge_snapshot(), "float32", **kw)


def config(name, arg=""):
    s = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    m = importlib.util.module_from_spec(s)
    s.loader.exec_module(m)
    return m.get_config(arg)


def qwen_backend_config(c):
    q = c.backend.qwen3_vl
    q.model_dir, q.dtype, q.max_new_tokens, q.batch_size, q.seq_bucket = judge_snapshot(), "float32", NEW, 8, 128
    c.progress = False
    return c


RUBRIC = """Theme 1: Prompt alignment
- Every object has the colour named in the prompt.
- Every object has the shape named in the prompt.
Theme 2: Composition
- The number of objects equals the count stated in the prompt.
"""


def test_induction_and_evaluation_through_entry_points(tmp_path):
    from arr_jax import evaluate as evaluate_main
    from arr_jax.arr.induction import induce_from_config
    from arr_jax.judge import parsing

    # induction on 50 labelled world pairs: the random model's rubrics never parse, so every pair is
    # refined T_max times and discarded, each answer recorded as a parse failure in the journal
    ic = qwen_backend_config(config("induce_world", "qwen3_vl"))
    ic.workdir = str(tmp_path / "induce")
    ic.data.n_pairs, ic.data.label_noise = 50, 0.0
    ic.induction.k, ic.induction.t_max, ic.induction.batch_pairs = 2, 1, 25
    with pytest.raises(RuntimeError, match="every one of the 50 pairs was discarded"):
        induce_from_config(ic)
    journal = [json.loads(x) for x in (Path(ic.workdir) / "journal.jsonl").read_text().splitlines()[1:]]
    assert len(journal) == 50 and all(r["status"] == "discarded" for r in journal)
    for r in journal:
        assert r["calls"] == {"generate": 1, "refine": 1}     # nothing readable to verify
        assert sum(r["statuses"].values()) == 2
        assert all(k.split(":")[1] in parsing.FAILURES for k in r["statuses"]), r["statuses"]
        assert [h["task"] for h in r["history"]] == ["generate", "refine"]

    # evaluation on 500 held-out pairs, with and without a rubric: junk answers are parse failures
    ec = qwen_backend_config(config("evaluate_world", "qwen3_vl"))
    ec.workdir = str(tmp_path / "eval")
    ec.data.n_pairs, ec.batch_size = 500, 50
    ec.rubric = str(tmp_path / "rubric.txt")
    Path(ec.rubric).write_text(RUBRIC)
    rep = evaluate_main.run(ec)
    assert rep["n_pairs"] == 500 and rep["backend"]["kind"] == "qwen3_vl" and "qwen3_vl" in rep["judge"]
    assert set(rep["conditions"]) == {"direct", "rubric"}
    for cond, res in rep["conditions"].items():
        m = res["overall"]
        assert m["parse_fail_fwd"] > 0 and m["parse_fail_rev"] > 0, (cond, res["statuses"])
        assert 0 <= m["acc_fwd"] <= 1 and 0 <= m["acc_rev"] <= 1
        assert sum(res["statuses"]["fwd"].values()) == 500
    assert (Path(ec.workdir) / "report.json").exists() and (Path(ec.workdir) / "report.md").exists()

    # the same evaluation reading P(image 1) from the rank token: no parsing, so no parse failures
    ec.workdir = str(tmp_path / "eval_p")
    ec.judge.choice_scores = True
    ec.conditions = ("direct",)
    rep = evaluate_main.run(ec)
    m = rep["conditions"]["direct"]["overall"]
    assert rep["judge"].endswith("/p_first") and m["parse_fail_fwd"] == 0 and m["parse_fail_rev"] == 0
    assert 0 <= m["avg"] <= 1


def pair_batch(n=5, seed=3):
    from arr_jax.world import spec
    from arr_jax.world.arr_backend import world_pairs

    pairs = world_pairs(n, seed=seed, prompts=spec.HELDOUT_PROMPTS)
    return [p.prompt for p in pairs], np.stack([p.image1 for p in pairs]), np.stack([p.image2 for p in pairs])


def test_p_first_fast_path_is_a_consistent_probability():
    import jax
    import jax.numpy as jnp

    from arr_jax.judge.text_judge import TextJudge
    from arr_jax.judge.vlm_backend import RANK_PREFIX

    b = backend()
    prompts, i1, i2 = pair_batch()
    plain = TextJudge(b)
    fwd_reqs = plain.pair_requests(prompts, i1, i2, RUBRIC)
    rev_reqs = plain.pair_requests(prompts, i2, i1, RUBRIC)
    p_fwd, p_rev = b.p_first(fwd_reqs), b.p_first(rev_reqs)
    for p in (p_fwd, p_rev):
        assert p.shape == (5,) and p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))

    # batched and bucketed == one request at a time == the prefill logits of the rank token
    one = np.concatenate([b.p_first([r]) for r in fwd_reqs[:2]])
    np.testing.assert_allclose(one, p_fwd[:2], atol=1e-5)
    inputs = b.processor([fwd_reqs[0].to_chat()], assistant_prefix=RANK_PREFIX, seq_bucket=None)
    assert b.processor.decode(inputs["input_ids"][0, -3:]).endswith("[")
    logits, _ = b.decoder.prefill(inputs, inputs["input_ids"].shape[1] + 1)
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))[0, b.choice_ids]
    np.testing.assert_allclose(p_fwd[0], 1 / (1 + np.exp(lp[1] - lp[0])), atol=1e-5)

    # TextJudge uses the fast path: both orders from one call, flipped back consistently
    fast = TextJudge(b, choice_scores=True)
    f, r, sf, sr = fast.compare_orders(prompts, i1, i2, RUBRIC)
    # both orders in one call: another batch composition, so float32 noise as for the batching check above
    np.testing.assert_allclose(f.p_first, p_fwd, atol=1e-5)
    np.testing.assert_allclose(r.p_first, 1 - p_rev, atol=1e-5)
    np.testing.assert_array_equal(f.winner, np.where(p_fwd > 0.5, 1, 2))
    assert sf == ["ok"] * 5 and not f.failures
    # symmetrised by the mean: judging the swapped pairs gives exactly the complement
    sym = TextJudge(b, choice_scores=True, symmetrize="mean")
    a, z = sym.compare(prompts, i1, i2, RUBRIC), sym.compare(prompts, i2, i1, RUBRIC)
    np.testing.assert_allclose(a.p_first + z.p_first, 1.0, atol=1e-6)
    np.testing.assert_allclose(a.p_first, (p_fwd + 1 - p_rev) / 2, atol=1e-6)
    assert b.calls["p_first"] >= 6 * 5

    with pytest.raises(ValueError, match="choice_scores needs mode 'pairwise'"):
        TextJudge(b, mode="pointwise", choice_scores=True)
    from arr_jax.world.arr_backend import WorldBackend

    with pytest.raises(ValueError, match="backend with p_first"):
        TextJudge(WorldBackend(), choice_scores=True)


def test_generate_batches_match_one_by_one():
    """Sorting, padding to a power-of-two batch and bucketing do not change greedy answers."""
    from arr_jax.judge.text_judge import TextJudge

    b = backend()
    prompts, i1, i2 = pair_batch(3, seed=5)
    reqs = TextJudge(b).pair_requests(prompts, i1, i2)
    got = b.generate(reqs)
    assert len(got) == 3 and all(isinstance(t, str) for t in got)
    assert [b.generate([r])[0] for r in reqs] == got


def test_p_first_reads_after_the_templates_generation_prompt(tmp_path):
    """A snapshot shipping a Thinking-style chat template (its generation prompt opens ``<think>\\n``): the
    pairwise score is read after the closed-empty block and the rank prefix, i.e. at the position that
    transformers' rendering of the template's own non-thinking prompt + ``{"rank": [`` gives; with
    ``reasoning="refuse"`` the backend refuses instead of scoring somewhere the model never answers."""
    from test_chat_template import THINKING
    from transformers import PreTrainedTokenizerFast

    from arr_jax.judge.processor import Qwen3VLProcessor
    from arr_jax.judge.text_judge import TextJudge
    from arr_jax.judge.vlm_backend import RANK_PREFIX, FlaxVLMBackend
    from arr_jax.models.qwen3_vl import prepare_inputs

    d = tmp_path / "thinking_judge"
    shutil.copytree(judge_snapshot(), d)
    (d / "chat_template.jinja").write_text(THINKING)
    b = FlaxVLMBackend.from_snapshot(d, "float32", max_new_tokens=NEW, batch_size=8, seq_bucket=128)
    prompts, i1, i2 = pair_batch(2)
    reqs = TextJudge(b).pair_requests(prompts, i1, i2, RUBRIC)
    got = b.p_first(reqs)

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    for row, req in enumerate(reqs):
        msgs, imgs = req.to_chat()
        text = hf_tok.apply_chat_template(msgs, chat_template=THINKING, add_generation_prompt=True, tokenize=False,
                                          enable_thinking=False)
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        ids, pv, grid = b.processor.encode(text + RANK_PREFIX, imgs)
        inputs = prepare_inputs(b.processor.model_cfg, np.array([ids]), None, pv, grid)
        lp = b.decoder.score_choices(inputs, b.choice_ids)[0].astype(np.float64)
        np.testing.assert_allclose(got[row], 1 / (1 + np.exp(lp[1] - lp[0])), atol=1e-5)
    # the hand-written format (no <think> block) scores elsewhere, so the template changes the answer
    plain = backend().p_first(reqs)
    assert np.abs(plain - got).max() > 1e-4, (plain, got)

    b.processor = Qwen3VLProcessor.from_dir(d, reasoning="refuse")   # same model, refusing processor
    with pytest.raises(ValueError, match=r"chat_template\.jinja opens a reasoning block"):
        b.p_first(reqs)
