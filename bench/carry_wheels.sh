#!/usr/bin/env bash
# Fetch (on a machine with internet) the wheels bench/gpu_speed.sh installs on the GPU machine, which has torch,
# transformers, peft and accelerate but no registry: Python 3.12, x86-64 (fastapi and uvicorn for
# bench/decode_gpu.py's `zhtune serve`). The assets the bench reads travel beside them.
# Usage: bench/carry_wheels.sh [DEST]   (default .carry, git-ignored; carry it to the GPU call)
set -euo pipefail
DEST=${1:-.carry}
PY=${PYTHON:-python3}
SHARED=${SHARED:-/work/shared/assets}
mkdir -p "$DEST/wheels" "$DEST/assets"
rm -f "$DEST"/wheels/*.whl
plat=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  plat="$plat --platform $p"
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$DEST/wheels" \
  liger-kernel==0.8.5 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 cut_cross_entropy==25.1.1 \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 uvicorn==0.55.0 opentelemetry-api==1.45.3
$PY bench/slim_wheel.py "$DEST"/wheels/unsloth-2026.10.9-*.whl --drop studio/
$PY bench/slim_wheel.py "$DEST"/wheels/bitsandbytes-0.50.2-*.whl --keep_cuda 130,132
cp "$SHARED/tokenizers/llama2_sp32k.model" "$SHARED/data/alpaca_zh_demo.json" \
   "$SHARED/data/sharegpt_dummy_conversation.json" "$DEST/assets/"
ls -l "$DEST/wheels" "$DEST/assets"
du -sh "$DEST"
