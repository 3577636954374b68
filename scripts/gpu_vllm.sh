#!/usr/bin/env bash
# The real vLLM on the GPU machine (issue 30), the part that runs here: build the SmolLM2 artifacts, the vLLM
# bundle, the expectations and the chunks; then print the device calls to make, in order, while the machine stays
# warm (each carries one chunk folder; see scripts/gpu_vllm.py for what each device command does).
#   scripts/gpu_vllm.sh [VLLM_VERSION=0.23.0] [WORK=/work/vllm-work] [STORE=/work/vllm-store]
# Then copy $WORK/calls/cNN to <repo>/.gpu/vllm/cNN (git-ignored) and $WORK/tc to <repo>/.gpu/vllm/tc.
set -euo pipefail
V=${1:-0.23.0}; WORK=${2:-/work/vllm-work}; STORE=${3:-/work/vllm-store}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
export PYTHONPATH=$REPO
CORE="smollm2-int4 smollm2-fp8 smollm2-vllm-sym-g64"     # the demo, FP8, and the all-targets CT / GPTQ / GGUF
EXTRA="smollm2-vllm-sym-g32 smollm2-vllm-asym-g32"       # more compressed-tensors layouts, and an asymmetric GPTQ
for p in $CORE $EXTRA; do
  f=profiles/$p.yaml; [ -f "$f" ] || f=profiles/vllm/$p.yaml
  python -m toolchain build "$f" --store "$STORE" --json > "$WORK/$p.json"
done
python scripts/gpu_vllm.py bundle --version "$V" --out "$WORK/bundle"
rm -rf "$WORK/prep"
python scripts/gpu_vllm.py prepare --store "$STORE" --out "$WORK/prep" $CORE $EXTRA
python scripts/gpu_vllm.py pack "$WORK/bundle" "$WORK/prep" --out "$WORK/calls" --first $(printf '%s/ ' $CORE)
rm -rf "$WORK/tc" && mkdir -p "$WORK/tc/scripts"   # the code the device runs: this checkout's, not the repo's
cp -r toolchain "$WORK/tc/" && cp scripts/gpu_vllm.py scripts/bench_gpu.py "$WORK/tc/scripts/"
find "$WORK/tc" -name __pycache__ -prune -exec rm -rf {} +
n=$(ls -d "$WORK"/calls/c* | wc -l)
echo "device calls (carry .gpu/vllm/cNN; the first also .gpu/vllm/tc):"
echo "  c00:       mkdir -p /tmp/vllm-recv && mv .gpu/vllm/c00/* /tmp/vllm-recv/ && cp -r .gpu/vllm/tc /tmp/tc"
echo "  c01..c$(printf %02d $((n - 1))): mkdir -p /tmp/vllm-recv && mv .gpu/vllm/cNN/* /tmp/vllm-recv/"
echo "  once the core streams are in: cd /tmp/tc && python3 scripts/gpu_vllm.py device-install &&"
echo "      python3 scripts/gpu_vllm.py device-check --out \$OUT"
echo "  speed: cd /tmp/tc && python3 scripts/gpu_vllm.py device-speed --out \$OUT"
