#!/usr/bin/env bash
# Installs everything, then runs the main job on the embedded default.
# Until the DeepSpeed trainer lands (issue 5) this is a short stage-1 training demo:
# real BERT-initialised Q-Former, ITC + ITM + ITG, AdamW with clipping. Extra args go to it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m blip2_ds.info
python -m blip2_ds.demo "$@"
