#!/usr/bin/env bash
# Greedy generation from a prompt on the Megatron model (converted on the fly from the HF
# checkpoint, at the layout), through the model's own tokenizer and chat template. Called by
# examples/models/<org>/<model>/inference.sh, which sets MODEL, TP, PP, EP, ETP.
#   MBRIDGE_EXAMPLE_MODEL  an HF directory to use instead of MODEL (CI: a toy with a word tokenizer)
#   PROMPT, MAX_NEW_TOKENS the request (defaults: a factual question, 32 tokens)
#   MBRIDGE                the mbridge command (default: mbridge)
set -euo pipefail
SRC=${MBRIDGE_EXAMPLE_MODEL:-$MODEL}
MBRIDGE=${MBRIDGE:-mbridge}
set -x
$MBRIDGE generate --hf "$SRC" --prompt "${PROMPT:-What is the capital of France? Answer in one word.}" \
  --max-new-tokens "${MAX_NEW_TOKENS:-32}" --tp "${TP:-1}" --pp "${PP:-1}" --ep "${EP:-1}" ${ETP:+--etp "$ETP"}
