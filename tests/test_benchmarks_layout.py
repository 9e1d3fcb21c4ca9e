"""GenEval and DPG-Bench output layouts (`arr_jax.data.benchmarks`, `python -m arr_jax.sample`).

The layouts are checked against small files written in the benchmarks' own formats, and read back
the way their scorers read them: `_geneval_scorer_view` follows the folder walk of GenEval's
``evaluation/evaluate_images.py`` (djghosh13/geneval), `_dpg_scorer_view` the file listing and the
crop boxes of DPG-Bench's ``dpg_bench/compute_dpg_bench.py`` (TencentQQGYLab/ELLA).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arr_jax.data.benchmarks import (BenchmarkFormatError, DPGLayout, GenEvalLayout, make_layout, noise_seed,
                                     read_dpg_prompts, read_geneval_metadata, read_prompts, write_benchmark)

ROOT = Path(__file__).resolve().parents[1]
R = 8  # fake sample resolution

# Lines in the form of GenEval's prompts/evaluation_metadata.jsonl (one with non-ASCII text, kept verbatim).
GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, '
    '"position": ["right of", 0]}], "exclude": [], "prompt": "a photo of a dog right of a cat"}',
    '{"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}], '
    '"prompt": "a photo of a red car \u2014 caf\u00e9 style"}',
]
# File names in the form of ELLA's dpg_bench/prompts/.
DPG_PROMPTS = {"1": "An eye-catching vibrant red pickup truck parked on the sandy shore at dusk.",
               "COCOval2014000000005961": "A kitchen with a white stove and a wooden table.",
               "partiprompts29": "a red cube on top of a blue sphere"}


def fake_image(prompt: str, seed: int, r: int = R) -> np.ndarray:
    rng = np.random.default_rng([seed, len(prompt), sum(map(ord, prompt))])
    return rng.integers(0, 256, (r, r, 3), dtype=np.uint8)


class FakeSampler:
    """Deterministic uint8 images from (prompt, seed); records every call."""

    def __init__(self, r: int = R):
        self.r, self.calls = r, []

    def __call__(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        return np.stack([fake_image(p, s, self.r) for p, s in zip(prompts, seeds)])


def _geneval_scorer_view(imagedir: Path) -> list[tuple[str, dict, str]]:
    """(folder, metadata, image path) for every image GenEval's evaluate_images.py would score."""
    seen = []
    for sub in os.listdir(imagedir):
        folder = os.path.join(imagedir, sub)
        if not os.path.isdir(folder) or not sub.isdigit():
            continue
        with open(os.path.join(folder, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for name in os.listdir(os.path.join(folder, "samples")):
            path = os.path.join(folder, "samples", name)
            if os.path.isfile(path) and re.match(r"\d+\.png", name):
                seen.append((sub, metadata, path))
    return sorted(seen, key=lambda t: t[2])


def _dpg_scorer_view(root: Path, resolution: int, pic_num: int = 4) -> dict[str, list[np.ndarray]]:
    """item id -> the pic_num crops DPG-Bench's compute_dpg_bench.py would score, for every file in root."""
    boxes = [(0, 0, resolution, resolution), (resolution, 0, resolution * 2, resolution),
             (0, resolution, resolution, resolution * 2), (resolution, resolution, resolution * 2, resolution * 2)]
    out = {}
    for fn in os.listdir(root):
        key = os.path.basename(fn).split(".")[0]
        with Image.open(os.path.join(root, fn)) as im:
            out[key] = [np.asarray(im.crop(b).convert("RGB")) for b in boxes[:pic_num]]
    return out


def _geneval_file(tmp_path: Path, lines=GENEVAL_LINES) -> Path:
    p = tmp_path / "evaluation_metadata.jsonl"
    p.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a trailing blank line is skipped
    return p


def _dpg_folder(tmp_path: Path, prompts=DPG_PROMPTS) -> Path:
    d = tmp_path / "dpg_bench" / "prompts"
    d.mkdir(parents=True)
    for stem, text in prompts.items():
        (d / f"{stem}.txt").write_text(text, encoding="utf-8")
    return d


# ------------------------------------------------------------------------------ GenEval

def test_geneval_layout(tmp_path):
    items = read_geneval_metadata(_geneval_file(tmp_path))
    assert [it.key for it in items] == ["00000", "00001", "00002"]
    out = tmp_path / "geneval"
    sampler = FakeSampler()
    res = write_benchmark(GenEvalLayout(out, 4, grid=True), items, sampler, batch_size=3, seed=5, progress=False)
    assert (res.total, res.skipped) == (3, 0)
    assert sorted(os.listdir(out)) == ["00000", "00001", "00002"]
    # 12 samples in batches of exactly 3 (no padding needed), with the seeds noise_seed names
    assert len(sampler.calls) == 4 and all(len(p) == len(s) == 3 for p, s in sampler.calls)
    for line, it in zip(GENEVAL_LINES, items):
        folder = out / it.key
        assert sorted(os.listdir(folder)) == ["grid.png", "metadata.jsonl", "samples"]
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png", "0002.png", "0003.png"]
        text = (folder / "metadata.jsonl").read_text(encoding="utf-8")
        assert text == line + "\n" and json.loads(text) == json.loads(line)
        samples = [np.asarray(Image.open(folder / "samples" / f"{k:04d}.png")) for k in range(4)]
        for k, im in enumerate(samples):
            np.testing.assert_array_equal(im, fake_image(json.loads(line)["prompt"], noise_seed(5, it.prompt, k)))
        grid = np.asarray(Image.open(folder / "grid.png"))
        assert grid.shape == (2 * R, 2 * R, 3)
        np.testing.assert_array_equal(grid[:R, R:], samples[1])
        np.testing.assert_array_equal(grid[R:, :R], samples[2])
    view = _geneval_scorer_view(out)
    assert len(view) == 12
    assert [(sub, meta) for sub, meta, _ in view[::4]] == [(it.key, json.loads(line))
                                                           for it, line in zip(items, GENEVAL_LINES)]
    assert {str(p) for p in res.written} == ({str(out / it.key / f) for it in items for f in
                                             ("grid.png", "metadata.jsonl")} | {p for _, _, p in view})


def test_geneval_rerun_skips_complete_prompts_and_resumes_the_rest(tmp_path):
    items = read_geneval_metadata(_geneval_file(tmp_path))
    out = tmp_path / "geneval"
    layout = GenEvalLayout(out, 4, grid=False)
    write_benchmark(layout, items, FakeSampler(), batch_size=2, progress=False)
    assert not (out / "00000" / "grid.png").exists()

    again = FakeSampler()
    res = write_benchmark(layout, items, again, batch_size=2, progress=False)
    assert again.calls == [] and (res.skipped, res.written) == (3, [])

    # a lost sample and a killed run's temporary file: only that prompt is sampled again, identically
    lost = out / "00001" / "samples" / "0002.png"
    before = np.asarray(Image.open(lost))
    lost.unlink()
    (out / "00002" / "samples" / ".partial-0000.png").write_bytes(b"half a png")
    again = FakeSampler()
    res = write_benchmark(layout, items, again, batch_size=3, progress=False)
    assert res.skipped == 2 and {p for prompts, _ in again.calls for p in prompts} == {items[1].prompt}
    assert sum(len(p) for p, _ in again.calls) == 6  # 4 samples + 2 padding in batches of 3
    np.testing.assert_array_equal(np.asarray(Image.open(lost)), before)
    assert not (out / "00002" / "samples" / ".partial-0000.png").exists()

    # another metadata file into the same outdir is refused, naming the folder's metadata
    other = tmp_path / "other"
    other.mkdir()
    swapped = read_geneval_metadata(_geneval_file(other, GENEVAL_LINES[::-1]))
    with pytest.raises(BenchmarkFormatError, match=r"00000[/\\]metadata.jsonl holds"):
        write_benchmark(layout, swapped, FakeSampler(), batch_size=2, progress=False)


def test_geneval_metadata_errors_name_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    cases = [(GENEVAL_LINES[0] + "\n" + '{"tag": "x", "prompt": "a cat"', r"m\.jsonl:2: not a JSON line"),
             ("\n" + '{"tag": "x", "include": []}', r"m\.jsonl:2: no 'prompt'"),
             ('{"tag": "x", "prompt": "  "}', r"m\.jsonl:1: no 'prompt'"),
             ('["a photo of a cat"]', r"m\.jsonl:1: expected a JSON object, got list"),
             ("\n  \n", r"m\.jsonl has no JSON lines")]
    for text, msg in cases:
        p.write_text(text, encoding="utf-8")
        with pytest.raises(BenchmarkFormatError, match=msg):
            read_geneval_metadata(p)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        read_geneval_metadata(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------ DPG-Bench

def test_dpg_layout(tmp_path):
    folder = _dpg_folder(tmp_path)
    items = read_dpg_prompts(folder)
    assert [it.key for it in items] == sorted(DPG_PROMPTS) and all(it.prompt == DPG_PROMPTS[it.key] for it in items)
    assert [it.key for it in read_prompts("dpg", folder.parent)] == sorted(DPG_PROMPTS)  # dpg_bench/ works too
    out = tmp_path / "dpg"
    sampler = FakeSampler()
    res = write_benchmark(DPGLayout(out, R), items, sampler, batch_size=5, progress=False)
    assert sorted(os.listdir(out)) == sorted(f"{k}.png" for k in DPG_PROMPTS)  # nothing else: the scorer lists all
    assert sorted(map(str, res.written)) == sorted(str(out / f"{k}.png") for k in DPG_PROMPTS)
    assert all(len(p) == 5 for p, _ in sampler.calls) and len(sampler.calls) == 3  # 12 samples + 3 padding
    view = _dpg_scorer_view(out, R)
    assert sorted(view) == sorted(DPG_PROMPTS)
    for it in items:
        assert Image.open(out / f"{it.key}.png").size == (2 * R, 2 * R)
        for k, crop in enumerate(view[it.key]):
            np.testing.assert_array_equal(crop, fake_image(it.prompt, noise_seed(0, it.prompt, k)))

    again = FakeSampler()
    res = write_benchmark(DPGLayout(out, R), items, again, batch_size=4, progress=False)
    assert again.calls == [] and res.skipped == 3
    (out / "1.png").unlink()
    res = write_benchmark(DPGLayout(out, R), items, again, batch_size=4, progress=False)
    assert res.skipped == 2 and [p for p, _ in again.calls] == [[DPG_PROMPTS["1"]] * 4]
    with pytest.raises(BenchmarkFormatError, match=r"1\.png is 16x16, not the 32x32 grid"):
        write_benchmark(DPGLayout(out, 2 * R), items, FakeSampler(2 * R), batch_size=4, progress=False)


def test_dpg_prompt_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        read_dpg_prompts(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not a prompt")
    with pytest.raises(BenchmarkFormatError, match="empty has no .txt prompt files"):
        read_dpg_prompts(empty)
    (empty / "3.txt").write_text("\n  \n")
    with pytest.raises(BenchmarkFormatError, match=r"3\.txt: empty prompt file"):
        read_dpg_prompts(empty)
    (empty / "3.txt").write_text("a cat")
    (empty / "a.b.txt").write_text("a dog")
    with pytest.raises(BenchmarkFormatError, match=r"a\.b\.txt: .*would be 'a', not 'a\.b'"):
        read_dpg_prompts(empty)


def test_layout_and_sampler_errors(tmp_path):
    with pytest.raises(ValueError, match="2x2 grid of 4 samples, got n_samples=3"):
        make_layout("dpg", tmp_path, n_samples=3, resolution=R)
    with pytest.raises(ValueError, match="needs the sample resolution"):
        make_layout("dpg", tmp_path, resolution=0)
    with pytest.raises(ValueError, match="unknown benchmark 'tiif'"):
        make_layout("tiif", tmp_path)
    items = read_dpg_prompts(_dpg_folder(tmp_path))
    with pytest.raises(ValueError, match=r"need 4 of 16x16"):
        write_benchmark(DPGLayout(tmp_path / "o", 16), items, FakeSampler(R), batch_size=4, progress=False)
    floats = lambda prompts, seeds: np.zeros((len(prompts), R, R, 3), np.float32)
    with pytest.raises(ValueError, match=r"sample_fn returned float32 \(2, 8, 8, 3\); need uint8"):
        write_benchmark(GenEvalLayout(tmp_path / "g"), items, floats, batch_size=2, progress=False)


def test_noise_seeds_depend_on_seed_prompt_and_index_only():
    seeds = {noise_seed(s, p, k) for s in (0, 1) for p in ("a cat", "a dog") for k in range(4)}
    assert len(seeds) == 16 and all(0 <= x < 2 ** 31 for x in seeds)
    assert noise_seed(3, "a cat", 2) == noise_seed(3, "a cat", 2)


# ------------------------------------------------------------------------------ end to end: python -m arr_jax.sample

@pytest.fixture(scope="module")
def tiny_snapshot(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from _tiny_flux import build_tiny_pipeline

    d = tmp_path_factory.mktemp("flux_snapshot")
    build_tiny_pipeline(d)
    return d


def _sample(snapshot: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one CPU device, like a laptop run
    cmd = [sys.executable, "-m", "arr_jax.sample", f"--config={ROOT / 'configs/flux_dev_t2i.py'}:tiny",
           f"--config.model_dir={snapshot}", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parity
@pytest.mark.slow
def test_sample_entry_point_writes_both_layouts(tiny_snapshot, tmp_path):
    lines = ['{"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a red cat"}',
             '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a blue dog"}']
    meta = _geneval_file(tmp_path, lines)
    gen = tmp_path / "geneval"
    r = _sample(tiny_snapshot, "--config.sample.benchmark=geneval", f"--config.sample.benchmark_path={meta}",
                f"--config.outdir={gen}")
    assert "2 written, 0 already complete" in r.stdout and "evaluate_images.py" in r.stdout
    assert sorted(os.listdir(gen)) == ["00000", "00001"]
    view = _geneval_scorer_view(gen)
    assert [(sub, m) for sub, m, _ in view] == [(f"{i:05d}", json.loads(line))
                                                for i, line in enumerate(lines) for _ in range(4)]
    cat = [np.asarray(Image.open(gen / "00000" / "samples" / f"{k:04d}.png")) for k in range(4)]
    assert all(im.shape == (32, 32, 3) for im in cat)
    assert len({im.tobytes() for im in cat}) == 4  # four different noise seeds
    assert np.asarray(Image.open(gen / "00000" / "grid.png")).shape == (64, 64, 3)

    # DPG: the grid's four crops are the four samples of the same prompt (same noise seeds, same batches)
    prompts = _dpg_folder(tmp_path, {"7": "a red cat", "x1": "the dog on the photo"})
    dpg = tmp_path / "dpg"
    r = _sample(tiny_snapshot, "--config.sample.benchmark=dpg", f"--config.sample.benchmark_path={prompts}",
                f"--config.outdir={dpg}")
    assert "dist_eval.sh" in r.stdout
    assert sorted(os.listdir(dpg)) == ["7.png", "x1.png"]
    assert Image.open(dpg / "7.png").size == (64, 64)
    for crop, sample in zip(_dpg_scorer_view(dpg, 32)["7"], cat):
        np.testing.assert_array_equal(crop, sample)

    # rerun after losing one sample: one prompt skipped, the lost sample comes back identical
    lost = gen / "00001" / "samples" / "0001.png"
    before = np.asarray(Image.open(lost))
    lost.unlink()
    r = _sample(tiny_snapshot, "--config.sample.benchmark=geneval", f"--config.sample.benchmark_path={meta}",
                f"--config.outdir={gen}")
    assert "1 written, 1 already complete" in r.stdout
    np.testing.assert_array_equal(np.asarray(Image.open(lost)), before)


def test_sample_entry_point_refuses_bad_benchmark_input_before_loading(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"tag": "x", "prompt": "a cat"}\n{"tag": "y"}\n')
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "arr_jax.sample", f"--config={ROOT / 'configs/flux_dev_t2i.py'}:tiny",
            f"--config.model_dir={tmp_path / 'no_snapshot'}", f"--config.outdir={tmp_path / 'o'}"]
    r = subprocess.run(base + ["--config.sample.benchmark=geneval", f"--config.sample.benchmark_path={bad}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and f"{bad}:2: no 'prompt'" in r.stderr
    r = subprocess.run(base + ["--config.sample.benchmark=dpg", f"--config.sample.benchmark_path={tmp_path}",
                               "--config.sample.width=64"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "sample.height = sample.width" in r.stderr
