#!/usr/bin/env bash
# Everything GPU-specific in ONE call on the lent H200 (run launch/fetch_gpu_wheels.sh here first):
#   run(command="bash launch/gpu_check.sh", carry=[".whl"], timeout_s=590)
# A device command may run 10 minutes and a session has 15 device-minutes, start-up included, so
# the parts share one deadline (GPU_CHECK_SECONDS, default 540 s) and run most valuable first; a
# part gets at most its own cap and what is left, and is skipped (said so) below 20 s:
#   1. bf16 matmul peak;
#   2. step benchmark at real shapes, both stages (ViT-g + Q-Former; + OPT-2.7B), project vs
#      no-engine vs the original-style eager baseline in the same run, plus --plan for 16 GPUs;
#   3. kernel tests compiled for the GPU (tests/test_kernels.py, BLIP2_DS_TEST_GPU=1: real Triton, bf16);
#   4. kernel benchmark (kernels/bench.py: fused kernels vs eager, torch.compile, every SDPA backend);
#   5. stage 1 with the frozen tower under torch.compile against the eager tower (vision.compile);
#   6. the demo trainer in bf16 with kernels=triton (the CUDA paths end to end);
#   7. the data benchmark with the device-side transform.
# Full logs under $OUT, a short summary last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-540} ))
export PYTHONUNBUFFERED=1

part() {  # part NAME CAP_SECONDS COMMAND...: run with min(cap, time left), log to $OUT/NAME.log
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then echo "$name: skipped (${left}s left)" | tee "$OUT/$name.log"; return; fi
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$OUT/$name.log"
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

part matmul 60 python3 -c "from blip2_ds.train.metrics import measure_matmul_tflops; \
print(f'bf16 matmul 4096: {measure_matmul_tflops(\"cuda\"):.1f} TFLOP/s')"
part step_bench 260 python3 launch/bench.py --plan --gpus 16 --json "$OUT/step_bench.json"
part kernel_tests 100 env BLIP2_DS_TEST_GPU=1 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
part kernel_bench 80 python3 kernels/bench.py --json "$OUT/kernel_bench.json"
part compile_vit 150 python3 launch/bench.py --stage 1 --no-baseline --compile-vit default --steps 6
part assets 30 python3 -m blip2_ds.demo_assets
part train 60 python3 launch/train.py kernels=triton precision=bf16 vision.dtype=bf16 language.dtype=bf16 \
  max_steps=100 log_every=50 data.num_workers=4 output_dir="$OUT/demo_bf16"
part data_bench 40 python3 -m blip2_ds.data.bench --device cuda

echo "==== summary ===="
cat "$OUT/gpu.txt"
grep -h "TFLOP/s" "$OUT/matmul.log"
grep -vE "Warning|warn\(" "$OUT/step_bench.log" | tail -12
tail -2 "$OUT/kernel_tests.log"
grep -vE "Warning|warn\(" "$OUT/kernel_bench.log" | tail -14
grep -E "^stage|compiled" "$OUT/compile_vit.log"
grep -E "^step 100|exit" "$OUT/train.log" | tail -2
grep -E "ratio|device resize|pipeline CPU|exit" "$OUT/data_bench.log"
