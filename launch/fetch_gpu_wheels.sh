#!/usr/bin/env bash
# Run HERE (with network to the package index) before a device call: downloads into .whl/ the wheels
# that the lent GPU machine's image lacks (it has torch, triton, transformers, tensorboard, safetensors,
# numpy, pyyaml for Python 3.12). launch/gpu_check.sh installs them there. timm travels too although the
# image has one: open_clip builds EVA ViT-g from timm, and the image's version is not known here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
               "${platforms[@]}" -d .whl "$@"; }
download open_clip_torch==3.3.0 timm==1.0.31 ftfy wcwidth webdataset==1.0.2 braceexpand simplejpeg==1.9.0 \
         hjson pydantic pydantic-core annotated-types typing-inspection 'typing-extensions>=4.16' py-cpuinfo ninja \
         msgpack einops psutil \
         pytest==9.0.3 iniconfig pluggy packaging pygments
# deepspeed ships as a source archive: a pure-Python wheel (its ops JIT-compile on the GPU machine).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
ls -la .whl
