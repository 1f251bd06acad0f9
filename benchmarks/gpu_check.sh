#!/usr/bin/env bash
# The one prepared GPU run for the Triton kernels (issues 13 and 15), about 7 minutes on an H100/H200
# (run it with the device tool's limit, 600 s):
#   0. each kernel_bench step first compiles every kernel it will launch, on all but one host core
#      (benchmarks/triton_warmup.py), so its time budget measures instead of compiling;
#   1. every v1 and v2 path and format against the torch reference, outputs poisoned (--check);
#   2. fp4_e2m1 and nf4 g128 (interleaved per shape), fp16, Llama-2-7B/Llama-3-8B shapes, M = 1..4096,
#      against cuBLAS and PyTorch's int4 kernel, the tuner choosing v1 or v2 per shape (the goals table);
#   3. a DAQ checkpoint through transformers on CUDA, fp16 and bf16: every linear on triton with the v2
#      layout, logits against the torch kernel, the tuner's path per shape (gpu_loader_check.py);
#   4. the 3-bit formats beside fp4_e2m1 at M = 1 and 16;
#   5. the fused MoE kernel: correctness, CUDA-graph capture, speed (moe_kernel_bench.py);
#   6. fp4_e2m1 with bf16 activations at a few M.
# Results: kernels-<gpu>*.md/json, loader-<gpu>.md/json, moe-kernels-<gpu>.md/json and the tuned
# configs <gpu>.json (ship them as kernels/configs/<gpu>.json) in $OUT (the device tool's folder) or
# benchmarks/results.
# Every step runs under its own timeout and a failed step does not stop the next (each writes its
# results as it goes); the failures are listed in $RESULTS/failures.txt and the exit status is 1.
# Needs torch with CUDA and triton; daq-vllm installed, or run from the repository as here.
#   bash benchmarks/gpu_check.sh                  # every step
#   bash benchmarks/gpu_check.sh loader moe       # some of: kernels loader 3bit moe bf16 (a rerun after a fix)
set -uo pipefail
ALL_STEPS="kernels loader 3bit moe bf16"
STEPS="${*:-$ALL_STEPS}"
for s in $STEPS; do
  [[ " $ALL_STEPS " == *" $s "* ]] || { echo "unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2; }
done
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
rm -f "$RESULTS/failures.txt"  # this run's failures only
if ! python -c "import daq_vllm.kernels" 2>/dev/null; then
  # Not installed: the package layout (pyproject's package-dir) as a symlink farm.
  farm="$(mktemp -d)"
  mkdir "$farm/daq_vllm"
  for f in daq_vllm/*; do ln -s "$PWD/$f" "$farm/daq_vllm/"; done
  ln -s "$PWD/offline" "$farm/daq_vllm/offline"
  ln -s "$PWD/kernels" "$farm/daq_vllm/kernels"
  export PYTHONPATH="$farm${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
failed=0
step() {  # step NAME SECONDS COMMAND...: if NAME was asked for, run it under a timeout; note a failure, go on
  local name="$1" limit="$2"; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $(date +%T) $*"
  timeout "$limit" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ]; then
    echo "timed out after ${limit} s: $*" | tee -a "$RESULTS/failures.txt"
  elif [ "$rc" -ne 0 ]; then
    echo "exit $rc: $*" | tee -a "$RESULTS/failures.txt"
  fi
  [ "$rc" -eq 0 ] || failed=1
}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv | tee "$RESULTS/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RESULTS/gpu.txt"
bench=(python benchmarks/kernel_bench.py --results "$RESULTS" --write-configs)
# Most needed first: if the run nears the device tool's 10-minute limit, what is cut is the last step.
step kernels 280 "${bench[@]}" --check --formats fp4_e2m1 nf4 --budget-s 100
step loader 120 python benchmarks/gpu_loader_check.py --results "$RESULTS"
step 3bit 85 "${bench[@]}" --tag 3bit --formats fp4_e2m1 fp3_e2m0 int3 --ms 1 16 --models llama-3-8b --budget-s 35
step moe 100 python benchmarks/moe_kernel_bench.py --results "$RESULTS" --budget-s 30
step bf16 75 "${bench[@]}" --tag bf16 --formats fp4_e2m1 --dtypes bfloat16 --ms 1 16 64 256 --models llama-3-8b --budget-s 25
if ls kernels/configs/*.json >/dev/null 2>&1; then cp kernels/configs/*.json "$RESULTS/"; fi
echo "== $(date +%T) done, failed=$failed"
exit "$failed"
