"""``python -m arr_jax.memory``: print the memory plan of each ``--models`` entry (policy table, then the
table with the judge) and optionally write every row as JSON. See `arr_jax.memory`."""
from __future__ import annotations

import dataclasses
import json
import os


def main(argv) -> None:
    from absl import flags

    from arr_jax.memory import (WORKLOADS, abstract_judge, abstract_models, format_judge_table, format_table,
                                judge_plan, judge_workload, parse_topologies, plan)

    f = flags.FLAGS
    if f.compiled:  # the plan checked against libtpu's compiled figures (python -m arr_jax.preflight --json)
        from arr_jax.preflight import format_plan_check

        for path in filter(None, f.compiled.split(",")):
            with open(path) as fh:
                print(format_plan_check(json.load(fh)))
        return
    topologies = parse_topologies(f.topologies)
    names = [m.strip() for m in f.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"--models={f.models!r}: unknown {unknown or names}; use a comma-separated subset of "
                         f"{sorted(WORKLOADS)}")
    judge = abstract_judge() if f.judge else None
    out = {"workloads": {}, "rows": [], "judge_workloads": {}, "judge_rows": []}
    for i, name in enumerate(names):
        wl = WORKLOADS[name](height=f.resolution, width=f.resolution, micro_batch=f.micro_batch, remat=f.remat,
                             flash_attention=f.flash_attention, t5_resident=f.t5_resident)
        models = abstract_models(wl)
        rows = plan(topologies, wl, tensor=f.tensor, models=models)
        print(("\n" if i else "") + format_table(rows, wl))
        out["workloads"][name] = dataclasses.asdict(wl)
        out["rows"] += rows
        if judge is not None:
            jw = judge_workload(wl, batch=f.judge_batch, text_tokens=f.judge_text_tokens,
                                answer_tokens=f.judge_answer_tokens)
            jrows = judge_plan(topologies, wl, jw, tensor=f.tensor, models=models, judge=judge)
            print()
            print(format_judge_table(jrows, jw))
            out["judge_workloads"][name] = dataclasses.asdict(jw)
            out["judge_rows"] += jrows
    # the first model's workloads also under the singular keys (the JSON layout before --models)
    out["workload"] = out["workloads"][names[0]]
    if judge is not None:
        out["judge_workload"] = out["judge_workloads"][names[0]]
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(out, fh, indent=1)


def define_flags() -> None:
    from absl import flags

    from arr_jax.memory import WORKLOADS, JudgeWorkload, Workload, default_judge_batch
    from arr_jax.memory.shards import TOPOLOGIES

    flags.DEFINE_string("models", ",".join(WORKLOADS), "comma-separated: flux_dev (the T2I batch), qwen_image_edit "
                        "(the editing batch)")
    flags.DEFINE_string("topologies", ",".join(TOPOLOGIES), "comma-separated names or name=devices:hbm_gb")
    flags.DEFINE_integer("micro_batch", Workload.micro_batch, "samples per forward (global)")
    flags.DEFINE_integer("resolution", 512, "image side")
    flags.DEFINE_integer("tensor", 2, "tensor-parallel axis size of the FSDP+TP rule set")
    flags.DEFINE_boolean("remat", True, "per-block rematerialisation in the update")
    flags.DEFINE_boolean("flash_attention", False, "attention without materialised scores")
    flags.DEFINE_boolean("t5_resident", True, "count the big text encoder (T5-XXL / Qwen2.5-VL) as resident on "
                         "device (policy table; the judge table shows both)")
    flags.DEFINE_boolean("judge", True, "add the Qwen3-VL-8B judge table (same mesh / own sub-mesh) for each model")
    flags.DEFINE_integer("judge_batch", default_judge_batch(), "judge prompts per prefill "
                         "(default: judge.qwen3_vl.batch_size of arr_jax.judge.factory.judge_config)")
    flags.DEFINE_integer("judge_text_tokens", JudgeWorkload.text_tokens, "non-image tokens of one pairwise "
                         "prompt: chat markup, template, rubric, prompt")
    flags.DEFINE_integer("judge_answer_tokens", JudgeWorkload.answer_tokens, "answer tokens the KV cache holds "
                         "(judge.qwen3_vl.max_new_tokens)")
    flags.DEFINE_string("json", "", "also write the rows here")
    flags.DEFINE_string("compiled", "", "comma-separated preflight reports (python -m arr_jax.preflight --json=F): "
                        "print each analytic row beside the TPU compiler's figure instead of the plan")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import app

    define_flags()
    app.run(main)
