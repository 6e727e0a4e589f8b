#!/usr/bin/env bash
# The main job on the embedded default: installs everything, builds the demo assets (synthetic
# shapes-and-colours shards, a tiny frozen ViT, a tiny frozen OPT), trains stage 1 then stage 2
# with DeepSpeed ZeRO-2 over 2 processes (GPUs if there are, CPU processes otherwise), and prints
# a summary: losses, held-out retrieval against chance, sample captions, where the logs are; then
# evaluates both checkpoints with `python -m blip2_ds.eval` (retrieval recalls, caption metrics).
# About 8 minutes on a 2-core CPU machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  ranks=$(nvidia-smi -L | wc -l)
else
  ranks=2
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1   # one thread per rank: 2 ranks share the cores
fi
stage1=runs/demo
stage2=runs/demo_stage2

python -m blip2_ds.demo_assets
echo "[quickstart] stage 1: ITC + ITM + ITG, ${ranks} ranks"
# --resume auto: a second quickstart continues (or, finished, keeps) the first one's runs instead of
# being refused for writing over them; remove runs/ to start over.
deepspeed --num_gpus "$ranks" launch/train.py --ds ds_configs/zero2.json --resume auto output_dir=$stage1 "$@"
last=$(cat $stage1/checkpoints/latest)
echo "[quickstart] stage 2: soft prompts into the frozen OPT, from $stage1/checkpoints/$last"
deepspeed --num_gpus "$ranks" launch/train.py --ds ds_configs/zero2.json --resume auto stage=2 max_steps=800 \
  optim.lr=0.002 optim.warmup_steps=30 optim.min_lr=0.0002 output_dir=$stage2 \
  pretrained.qformer_checkpoint=$stage1/checkpoints/$last/model.safetensors "$@"
python -m blip2_ds.demo_report --config configs/demo.yaml --stage1 $stage1 --stage2 $stage2
echo "[quickstart] evaluation of both checkpoints on the held-out shard (python -m blip2_ds.eval)"
python -m blip2_ds.eval retrieval --checkpoint $stage1 --shards demo_assets/data/val/demo-00000.tar --k 16
python -m blip2_ds.eval caption --checkpoint $stage2 --shards demo_assets/data/val/demo-00000.tar --limit 100
