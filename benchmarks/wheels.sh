#!/usr/bin/env bash
# Download, here, the pure-Python packages that the lent GPU machine's image lacks, into .whl/ (ignored
# by git, never committed). The GPU image already has jax 0.11 (CUDA 13), flax, optax, orbax, chex,
# torch 2.11, transformers, tokenizers, safetensors, jinja2, pillow, tqdm and absl; the benchmarks
# also import diffusers (the PyTorch side), peft (LoRA on the PyTorch side; pinned like our test
# extra) and ml_collections (configs/flux_dev_t2i.py). Nothing in benchmarks/gpu_suite.sh imports
# tensorflow-datasets (checked: it is not in sys.modules after the suite's imports); WITH_TFDS=1
# adds it and array-record for entry points that read tfds prompt sets.
#
#   bash benchmarks/wheels.sh            # then, with the device tool:
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=590)
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
PY=${PYTHON:-python3}
pkgs=(diffusers==0.42.1 peft==0.21.2 ml-collections==1.1.0 importlib-metadata==8.7.0)
if [ "${WITH_TFDS:-0}" = 1 ]; then pkgs+=(tensorflow-datasets==4.9.10 array-record==0.8.6 immutabledict promise \
  simple-parsing termcolor toml dm-tree tensorflow-metadata); fi
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}"
ls -la .whl
