#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (CPU only). Extra args go to pytest,
# e.g. `bash launch/test.sh -m "not slow"` or `bash launch/test.sh tests/test_masks.py`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m pytest -q --durations=10 "$@"
