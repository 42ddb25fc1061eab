#!/usr/bin/env bash
# Build the payload for the offline GPU box, on a machine with PyPI access.
#
# The GPU box has CUDA 13 libraries, PyTorch and a CPU-only onnxruntime, and no network. Files reach it only
# through the repository copy made for each command, at most 64 MiB per command, so every file here bigger
# than CHUNK_MIB is cut into numbered chunks and the chunks are grouped into carry sets of at most one
# chunk's size (set k travels with device command k; see carry.md).
#
# Which onnxruntime-gpu: since onnxruntime 1.27 the default PyPI `onnxruntime-gpu` wheels are the CUDA 13
# builds and the CUDA 12 packages are deprecated and named as such (ONNX Runtime v1.27.0 release notes,
# https://github.com/microsoft/onnxruntime/releases/tag/v1.27.0). Checked for 1.31.1 (the newest on PyPI
# when this was written; the CPU `onnxruntime` is at 1.32): its CUDA provider library needs libcudart.so.13,
# libcublas.so.13, libcublasLt.so.13 and libcurand.so.10, its METADATA pins nvidia-*~=13 / nvidia-cudnn-cu13
# under the `cuda` / `cudnn` extras. So no nvidia-*-cu12 wheels are needed: the box's CUDA 13 libraries
# (from PyTorch's nvidia-* wheels) serve. The TensorRT provider library needs libnvinfer.so.10 and
# libnvonnxparser.so.10 (TensorRT 10 for CUDA 13): present only if the box has TensorRT; the TensorRT
# wheels are over a GB, too many 64 MiB calls, so they are not in the payload by default (TRT_WHEELS=1
# adds tensorrt-cu13-libs, at your own cost in calls).
#
# Usage: bench/gpu/prepare.sh [--dry-run]
#   PYVER=3.11      Python of the GPU box (the wheel is per CPython version: check it with call 0 of carry.md)
#   ORT_VERSION=1.31.1   CHUNK_MIB=60   PAYLOAD=bench/gpu/payload
#   EXTRA="diffusers==0.x onnx==1.y"    more wheels for whatever call 0 finds missing (downloaded --no-deps)
#   --dry-run / DRY_RUN=1: no download; a small random stand-in file (CHUNK_MIB defaults to 1) exercises
#   the split, the manifest and the carry sets.
set -euo pipefail
cd "$(dirname "$0")/../.."
DRY_RUN=${DRY_RUN:-0}; [[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PYVER=${PYVER:-3.11}
ORT_VERSION=${ORT_VERSION:-1.31.1}
PAYLOAD=${PAYLOAD:-bench/gpu/payload}
if [[ "$DRY_RUN" == 1 ]]; then CHUNK_MIB=${CHUNK_MIB:-1}; else CHUNK_MIB=${CHUNK_MIB:-60}; fi
PIP=${PIP:-python3 -m pip}
[[ -x .venv/bin/python ]] && PIP=${PIP_OVERRIDE:-.venv/bin/python -m pip}

rm -rf "$PAYLOAD"; mkdir -p "$PAYLOAD/wheels"
fetch() {   # pip download one requirement for the GPU box's Python, binary wheels only
    $PIP download "$1" --no-deps -d "$PAYLOAD/wheels" --python-version "$PYVER" --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform linux_x86_64 --platform any
}
if [[ "$DRY_RUN" == 1 ]]; then
    head -c $(( CHUNK_MIB * 1048576 * 5 / 2 )) /dev/urandom > "$PAYLOAD/wheels/standin-0.0-py3-none-any.whl"
else
    fetch "onnxruntime-gpu==$ORT_VERSION"
    [[ "${TRT_WHEELS:-0}" == 1 ]] && fetch "tensorrt-cu13-libs"
    for req in ${EXTRA:-}; do fetch "$req"; done
fi
python3 bench/gpu/chunks.py split "$PAYLOAD/wheels" "$PAYLOAD" --chunk-mib "$CHUNK_MIB"
rm -rf "$PAYLOAD/wheels"
echo "payload ready in $PAYLOAD:"; ls "$PAYLOAD"
echo "carry sets (one device command each, in order):"; cat "$PAYLOAD/sets.txt"
