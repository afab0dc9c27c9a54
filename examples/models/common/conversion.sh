#!/usr/bin/env bash
# Import an HF checkpoint into a Megatron-Core distributed checkpoint at a layout, export it back
# to HF and compare the two bit for bit. Called by examples/models/<org>/<model>/conversion.sh,
# which sets MODEL, TP, PP, EP, ETP and QUANTIZED (1: re-encode the published FP8/MXFP4 layout).
#   MBRIDGE_EXAMPLE_MODEL  an HF directory to use instead of MODEL (CI: a toy of the same config)
#   WORK                   where the checkpoints go (default: work/<model>)
#   MBRIDGE                the mbridge command (default: mbridge)
set -euo pipefail
SRC=${MBRIDGE_EXAMPLE_MODEL:-$MODEL}
WORK=${WORK:-work/${MODEL##*/}}
MBRIDGE=${MBRIDGE:-mbridge}
LAYOUT=(--tp "${TP:-1}" --pp "${PP:-1}" --ep "${EP:-1}")
[ -n "${ETP:-}" ] && LAYOUT+=(--etp "$ETP")
mkdir -p "$WORK"
set -x
$MBRIDGE convert import --hf "$SRC" --out "$WORK/megatron" "${LAYOUT[@]}" --overwrite
# the source's own layout and dtype; --fp8 writes quantized tensors back with their scales
$MBRIDGE convert export --megatron "$WORK/megatron" --hf-source "$SRC" --out "$WORK/hf" --overwrite \
  ${QUANTIZED:+--fp8}
$MBRIDGE convert compare "$SRC" "$WORK/hf"
