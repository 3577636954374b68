#!/usr/bin/env bash
# Builds a slim vLLM bundle to carry to the GPU machine in chunks (it has torch 2.11.0+cu130, Python 3.12 and no
# network). vLLM 0.20.0-0.26.0 pin torch==2.11.0 and are CUDA 13 builds with sm_90 kernels (FA3, Marlin).
# Adapted from the recipe in ../shared/gpu-vllm/make-bundle.sh (tested there for imports on a CPU only).
#
# One tar (not compressed again: the wheels are zip files already, and xz gained 16% on vLLM's CUDA libraries at
# minutes per library on this machine) holds the vllm wheel with the FA2 library, the vllm-rs binary, the MoE
# kernels and the DeepGEMM extensions of other Pythons deleted from it (`zip -d`: a dense model reaches none of them,
# and vLLM imports _moe_C and FA2 under try/except), and the dependency wheels the GPU image lacks
# (requirements-vllm-$V.txt minus device-has.txt, minus xgrammar and apache-tvm-ffi, which vLLM loads lazily for
# structured output only, plus extra-requirements.txt). The tar is split into CHUNK-sized parts (default 56 MiB:
# with the ~4 MB working tree, under the 64 MiB a device call carries).
#
# usage: make-bundle.sh OUTDIR [VLLM_VERSION=0.23.0]
# On the GPU machine (scripts/gpu_vllm.py device-install does this):
#   cat OUTDIR/vllm-V.tar.part* | tar xf - -C B
#   python3 -m pip install -q --no-index --no-deps --target /tmp/vsite B/whl/*.whl
#   PYTHONPATH=/tmp/vsite python3 -c 'import vllm'      (layered on the image's torch; its own compressed-tensors)
set -euo pipefail
OUT=${1:?usage: make-bundle.sh OUTDIR [VLLM_VERSION]}; V=${2:-0.23.0}; PY=3.12
HERE=$(cd "$(dirname "$0")" && pwd)
REQ=${REQ:-$HERE/requirements-vllm-$V.txt}
[ -f "$REQ" ] || { echo "no dependency list $REQ: write one (see requirements-vllm-0.23.0.txt)" >&2; exit 2; }
PIP=${PIP:-"python3 -m pip"}
PLAT="--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
DL="$PIP download -q --no-deps --only-binary=:all: --python-version $PY $PLAT"
rm -rf "$OUT/tmp" && mkdir -p "$OUT/tmp/whl"
# the wheels: the list minus what the image has (device-has.txt) minus the lazily loaded structured-output ones
norm() { tr 'A-Z_.' 'a-z--'; }
grep -v '^#' "$REQ" | while read -r spec; do
  [ -n "$spec" ] || continue
  name=$(echo "${spec%%[=<>!~ ]*}" | norm)
  if grep -qx "$name" "$HERE/device-has.txt" || [[ " xgrammar apache-tvm-ffi " == *" $name "* ]]; then continue; fi
  echo "$spec"
done > "$OUT/tmp/req.txt"
$DL -r "$OUT/tmp/req.txt" -r "$HERE/extra-requirements.txt" -d "$OUT/tmp/whl"
$DL "vllm==$V" -d "$OUT/tmp/whl"
( cd "$OUT/tmp/whl" && zip -q -d vllm-"$V"*.whl vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs \
    vllm/_moe_C.abi3.so 'vllm/third_party/deep_gemm/_C.cpython-31[013456]-*' )
tar cf "$OUT/vllm-$V.tar" -C "$OUT/tmp" whl
rm -rf "$OUT/tmp"
rm -f "$OUT/vllm-$V.tar.part"*
split -b "${CHUNK:-56m}" -d "$OUT/vllm-$V.tar" "$OUT/vllm-$V.tar.part" && rm "$OUT/vllm-$V.tar"
du -sh "$OUT"/vllm-"$V".tar.part* | sort -k2
