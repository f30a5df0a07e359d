#!/usr/bin/env bash
# Wheels for the GPU machine's python3 (3.12 when last seen there; also 3.11, 3.13 and 3.14, in case
# the image changes: fastapi 0.165 needs 3.11 or later), whose image lacks pyzmq, msgspec, fastapi,
# uvicorn and pydantic (it has torch, triton, numpy, tokenizers, safetensors, httpx, aiohttp,
# pytest), nor llguidance (structured outputs); tqdm, prometheus_client and psutil for gpu_sweep.py's
# `pdserve sweep` (not seen there yet); anyio, click and h11 are pinned too, at the versions
# this repo is tested with. Into runs/gpu_wheels (git-ignored, 16 MB). Run once here; name
# runs/gpu_wheels in the device run's carry: benchmarks/gpu_check.py picks the wheels
# that fit its Python (one per project) and pip-installs them (--no-index) into a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=runs/gpu_wheels
mkdir -p "$DEST"
for V in ${PYTHON_VERSIONS:-3.11 3.12 3.13 3.14}; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$V" --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" \
    pyzmq==27.3.0 msgspec==0.22.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.54.0 opentelemetry-api==1.45.2 \
    typing_extensions==4.16.0 annotated-doc==0.0.7 anyio==4.16.0 click==8.5.1 h11==0.16.0 llguidance==1.9.1 \
    tqdm==4.70.1 prometheus_client==0.26.0 psutil==7.2.2
done
ls -la "$DEST"
