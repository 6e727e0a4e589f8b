#!/usr/bin/env bash
# Everything GPU-specific in one call on the lent H200 (see launch/fetch_gpu_wheels.sh first):
#   run(command="bash launch/gpu_check.sh", carry=[".whl"])
# Installs the carried wheels, then: the kernel tests compiled for the GPU (tests/test_kernels.py
# with BLIP2_DS_TEST_GPU=1: real Triton, real bf16), the kernel benchmark (kernels/bench.py at
# BLIP-2 shapes: fused kernels vs eager, torch.compile and every SDPA backend), the demo trainer in
# bf16 on the GPU with kernels=triton (checks the CUDA paths: the kernels, fused AdamW, SDPA, the
# device transform, bf16 towers), the data benchmark with the device-side transform on CUDA, a
# matmul peak, and the step benchmark (launch/bench.py at real shapes: stage 1 with ViT-g, stage 2
# with OPT-2.7B, each against the original-style eager baseline in the same run, plus --plan);
# full logs under $OUT, a short table last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

BLIP2_DS_TEST_GPU=1 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py > "$OUT/kernel_tests.log" 2>&1
echo "kernel tests exit: $?" >> "$OUT/kernel_tests.log"
timeout 300 python3 kernels/bench.py --json "$OUT/kernel_bench.json" > "$OUT/kernel_bench.log" 2>&1
echo "kernel bench exit: $?" >> "$OUT/kernel_bench.log"

python3 -m blip2_ds.demo_assets > "$OUT/assets.log" 2>&1 || echo "demo assets failed (see assets.log)"
timeout 300 python3 launch/train.py kernels=triton precision=bf16 vision.dtype=bf16 language.dtype=bf16 max_steps=200 \
  log_every=50 data.num_workers=4 output_dir="$OUT/demo_bf16" > "$OUT/train.log" 2>&1
echo "train exit: $?" >> "$OUT/train.log"
timeout 240 python3 -m blip2_ds.data.bench --device cuda > "$OUT/data_bench.log" 2>&1
python3 - <<'PY' > "$OUT/matmul.log" 2>&1
import torch
from blip2_ds.train.metrics import measure_matmul_tflops
print(f"bf16 matmul 4096: {measure_matmul_tflops('cuda'):.1f} TFLOP/s")
PY

timeout 420 python3 launch/bench.py --plan --gpus 16 --json "$OUT/step_bench.json" > "$OUT/step_bench.log" 2>&1
echo "step bench exit: $?" >> "$OUT/step_bench.log"

echo "==== summary ===="
cat "$OUT/gpu.txt"
tail -3 "$OUT/kernel_tests.log"
cat "$OUT/kernel_bench.log"
grep -E "^step 200|train exit" "$OUT/train.log" | tail -2
grep -E "ratio|device resize|pipeline CPU" "$OUT/data_bench.log"
cat "$OUT/matmul.log"
grep -vE "Warning|warn\(" "$OUT/step_bench.log" | tail -12
