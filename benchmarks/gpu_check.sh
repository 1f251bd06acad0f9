#!/usr/bin/env bash
# The one prepared GPU run for the Triton kernels (issues 13 and 15), about 6 minutes on an H100/H200:
#   1. every v1 and v2 path and format against the torch reference, outputs poisoned (--check);
#   2. fp4_e2m1 and nf4 g128, fp16, Llama-2-7B/Llama-3-8B shapes, M = 1..4096, against cuBLAS and
#      PyTorch's int4 kernel, the tuner choosing among v1 and v2 per shape (the goals table);
#   3. fp4_e2m1 with bf16 activations, and the 3-bit formats beside fp4_e2m1, at a few M;
#   4. the fused MoE kernel: correctness, CUDA-graph capture, speed (moe_kernel_bench.py).
# Results: kernels-<gpu>*.md/json, moe-kernels-<gpu>.md/json and the tuned configs <gpu>.json (ship them as
# kernels/configs/<gpu>.json) in $OUT (the device tool's folder) or benchmarks/results.
# Needs torch with CUDA and triton; daq-vllm installed, or run from the repository as here.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
if ! python -c "import daq_vllm.kernels" 2>/dev/null; then
  # Not installed: the package layout (pyproject's package-dir) as a symlink farm.
  farm="$(mktemp -d)"
  mkdir "$farm/daq_vllm"
  for f in daq_vllm/*; do ln -s "$PWD/$f" "$farm/daq_vllm/"; done
  ln -s "$PWD/offline" "$farm/daq_vllm/offline"
  ln -s "$PWD/kernels" "$farm/daq_vllm/kernels"
  export PYTHONPATH="$farm${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv | tee "$RESULTS/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RESULTS/gpu.txt"
bench=(python benchmarks/kernel_bench.py --results "$RESULTS" --write-configs)
"${bench[@]}" --check --formats fp4_e2m1 nf4 --budget-s 180
"${bench[@]}" --tag bf16 --formats fp4_e2m1 --dtypes bfloat16 --ms 1 16 64 256 --models llama-3-8b --budget-s 40
"${bench[@]}" --tag 3bit --formats fp4_e2m1 fp3_e2m0 int3 --ms 1 16 --models llama-3-8b --budget-s 50
python benchmarks/moe_kernel_bench.py --results "$RESULTS" --budget-s 45
cp kernels/configs/*.json "$RESULTS/"
