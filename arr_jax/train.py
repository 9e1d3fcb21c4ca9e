"""ARR-RPO training, for every policy kind, from one config.

    python -m arr_jax.train --config configs/demo.py                     # the world (after induce)
    python -m arr_jax.train --config configs/flux_dev_t2i.py --config.model_dir=/ckpt/FLUX.1-dev \\
        --config.prompts_file=prompts.txt --config.eval.prompts_file=heldout.txt \\
        --config.judge.kind=qwen3_vl --config.judge.model_dir=/ckpt/Qwen3-VL-8B-Instruct \\
        --config.judge.rubric=runs/arr/rubric.txt
    python -m arr_jax.train --config configs/flux_kontext.py --config.model_dir=/ckpt/FLUX.1-Kontext-dev \\
        --config.prompts_file=edits.jsonl --config.eval.prompts_file=heldout.jsonl ...

Builds the policy, the prompts, the judge (with the rubric) and the held-out evaluator from the
config (`arr_jax.rpo.run.build_run`), then trains (`arr_jax.rpo.run.train`): resumable from
``<workdir>/checkpoints``, LoRA files in ``<workdir>/lora``, and a closing summary of the held-out
win rate against the base and where every output went.
"""
from __future__ import annotations


def main(argv):
    del argv
    from arr_jax.cli import config_from_flags
    from arr_jax.rpo.run import build_run, summary, train

    run = build_run(config_from_flags())
    history = train(run)
    if run.is_writer:
        print(summary(run, history))


if __name__ == "__main__":
    from arr_jax.cli import run_main

    run_main(main)
