#!/usr/bin/env bash
# One training run of the served model on a GPU machine (how models/defkv-niah-7m was made):
# compiles ruler-dump, trains for MINUTES, exports the HF directory to OUT/model and checks it
# greedily on defkv-eval's seed at 4K tokens.
#   tools/train/run_gpu.sh OUT [MINUTES] [extra train.py flags, e.g. --resume]
# Needs python3 with torch (CUDA), tokenizers, safetensors, numpy and transformers (check.py), g++.
set -euo pipefail
OUT=${1:?usage: run_gpu.sh OUT [MINUTES] [train.py flags]}
MINUTES=${2:-7.2}
shift $(($# >= 2 ? 2 : 1))
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
WORK=${WORK:-/tmp/defkv-train}
mkdir -p "$WORK"
g++ -O2 -std=c++20 -Iclient/eval tools/train/ruler_dump.cpp client/eval/ruler.cpp -o "$WORK/ruler-dump"
export PYTHONUNBUFFERED=1
python3 tools/train/train.py --dump "$WORK/ruler-dump" --tokenizer tools/train/tokenizer --out "$WORK/run" \
  --export "$OUT/model" --device "${DEVICE:-cuda}" --minutes "$MINUTES" --log-every 25 "$@" 2>&1 | tee "$OUT/train.log"
cp "$WORK/run/log.jsonl" "$OUT/log.jsonl"
L=${CHECK_LENGTH:-4096}
timeout 75 python3 tools/train/check.py --model "$OUT/model" --dump "$WORK/ruler-dump" --length "$L" \
  --samples "${CHECK_SAMPLES:-20}" --tasks niah_single_1,niah_single_2 2>&1 | tee "$OUT/check.log" || true
timeout 45 python3 tools/train/check.py --model "$OUT/model" --dump "$WORK/ruler-dump" --length "$L" \
  --samples "${CHECK_SAMPLES_MORE:-8}" --tasks niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery \
  2>&1 | tee -a "$OUT/check.log" || true
