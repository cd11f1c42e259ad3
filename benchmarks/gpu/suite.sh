#!/usr/bin/env bash
# Every GPU measurement of issue 7 in one device call, most important first, each step
# bounded so the whole run ends before DEADLINE seconds (default 540). Logs and JSON go to
# $OUT (the device tool's folder; ./gpu-out elsewhere). Prepare with benchmarks/gpu/wheels.sh,
# then call the device with carry [".whl"] and the command `bash benchmarks/gpu/suite.sh`.
#
#   1. quantize kernels vs a device copy, 8192^2 fp32 and bf16, every MX preset + NVFP4
#   2. the 0.95B Llama (bf16, 32 x 512 tokens): HF forward, captured graph, unquantized and
#      W+A MXINT4 plans, eager (Triton quantize kernels)
#   3. search trials per hour, SmolLM2-135M's shape (random weights: the 93 MB model file
#      does not fit the transfer), eager
#   4. pytest -m gpu: the kernels against the reference bit for bit, the pipeline on the GPU
#   5. 2 under torch.compile;  6. 3 under torch.compile
# SMOKE=1 runs the same steps at toy sizes on the CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-540}
start=$(date +%s)
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi

step() {  # step NAME MIN_SECONDS COMMAND...: run if MIN_SECONDS are left, within what is left
  local name=$1 need=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - start) ))
  if [ "$left" -lt "$need" ]; then echo "=== $name: skipped, ${left}s left (needs ${need})" | tee -a "$OUT/summary.log"; return; fi
  echo "=== $name (${left}s left)" | tee -a "$OUT/summary.log"
  local t0=$(date +%s)
  # -P: the checkout's mpqc/ folder (without its mapped subpackages) must not shadow the installed mpqc.
  timeout "$left" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.log"
}

PY="python3 -P"
if [ "${SMOKE:-0}" = 1 ]; then
  DEV="--device cpu"; LLAMA="--hidden 128 --layers 2 --batch 2 --seq 64 --repeats 3"; TRIALS="--trials 3 --repeats 2 --n-samples 2 --seq-len 64"
else
  DEV="--device cuda"; LLAMA="--preset llama-0.95b --repeats 10"; TRIALS="--trials 40 --repeats 10 --n-samples 32 --seq-len 512"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/summary.log"
fi
$PY -c "import torch, transformers, optuna, mpqc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'optuna', optuna.__version__, 'mpqc', mpqc.__file__)" | tee -a "$OUT/summary.log"

[ "${SMOKE:-0}" = 1 ] || step quantize 60 $PY benchmarks/quantize_gpu.py --skip-compiled --json "$OUT/quantize.json"
step llama_eager 60 $PY benchmarks/set_plan.py $LLAMA $DEV --dtype bfloat16 --json "$OUT/llama_eager.json"
step trials_eager 60 $PY benchmarks/trial_cost.py --random-weights $TRIALS $DEV --dtype bfloat16 --skip-compiled --json "$OUT/trials_eager.json"
[ "${SMOKE:-0}" = 1 ] || step gpu_tests 60 $PY -m pytest tests/test_triton.py tests/test_gpu.py -m gpu -q -rs -p no:cacheprovider
step llama_compiled 120 $PY benchmarks/set_plan.py $LLAMA $DEV --dtype bfloat16 --torch-compile --no-fresh-compile --json "$OUT/llama_compiled.json"
step trials_compiled 120 $PY benchmarks/trial_cost.py --random-weights $TRIALS $DEV --dtype bfloat16 --json "$OUT/trials_compiled.json"
echo "total $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.log"
