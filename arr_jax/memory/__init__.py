"""Per-device memory plan of RPO for named topologies, with the Qwen3-VL-8B judge (abstract shapes; fast).

    python -m arr_jax.memory [--models=flux_dev,qwen_image_edit] [--topologies=v5p-8,v6e-8]
                             [--micro_batch=16] [--tensor=2] [--json=plan.json]
                             [--judge_batch=8] [--judge_text_tokens=1536] [--judge_answer_tokens=256]

Two policies: FLUX.1-dev text-to-image at SPEC §2's T2I batch (`flux`: FluxTransformer with LoRA,
T5-XXL, CLIP-L, the FLUX VAE) and Qwen-Image-Edit-2509 editing at the editing batch
(`qwen_image_edit`: QwenImageTransformer with LoRA, Qwen2.5-VL-7B, the Qwen-Image VAE; the source
image's latent tokens follow the target's). Parameters come from ``jax.eval_shape`` of our real
model classes at full width; a transformer's identical blocks are traced once and counted (FLUX:
19 double + 38 single, Qwen-Image: 60). The judge (Qwen3VLForConditionalGeneration) is traced
whole (~1 s). Each parameter's bytes per device follow its logical axes through the sharding rules
on an abstract mesh, exactly as `arr_jax.sharding.param_shardings` places it (`shards`).

Activations are an analytic estimate from the same shapes (`activation_bytes`,
`judge_activation_bytes`): the RPO update holds one micro-batch at one trained step (forward +
backward, per-block remat by default); the rollout holds one block's forward and the VAE decode;
the judge holds one batch of pairwise prompts (two images for T2I, three for editing: the source
first) through the vision tower and the prefill, with the KV cache of prompt + answer. The three
run one after the other, so the peak is their maximum on top of what stays resident. "fits" means
the total is at most ``usable`` (default 90%) of the device memory.

Two tables per policy: the policy alone (`plan`), and the policy with the judge (`judge_plan`),
either on the same mesh (the judge's weights sharded by the same rules over all devices) or on a
sub-mesh of its own (the smallest that fits, the policy on the rest).

Modules: `shards` (topologies, mesh shapes, bytes per device), `policy` (the workload, the policy
activations and table), `flux` and `qwen_image_edit` (each family's abstract models), `judge`,
`__main__` (the CLI).
"""
from arr_jax.memory.judge import (QWEN3_VL_8B_CONFIG, JudgeWorkload, abstract_judge, default_judge_batch,
                                  format_judge_table, judge_activation_bytes, judge_plan, judge_tokens,
                                  judge_workload)
from arr_jax.memory.policy import (FAMILIES, WORKLOADS, Workload, abstract_models, activation_bytes, format_table,
                                   plan, policy_bytes)
from arr_jax.memory.shards import GB, TOPOLOGIES, Topology, parse_topologies, rule_sets, shard_bytes

__all__ = ["FAMILIES", "GB", "JudgeWorkload", "QWEN3_VL_8B_CONFIG", "TOPOLOGIES", "Topology", "WORKLOADS", "Workload",
           "abstract_judge", "abstract_models", "activation_bytes", "default_judge_batch", "format_judge_table",
           "format_table", "judge_activation_bytes", "judge_plan", "judge_tokens", "judge_workload",
           "parse_topologies", "plan", "policy_bytes", "rule_sets", "shard_bytes"]
