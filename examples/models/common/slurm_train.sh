#!/usr/bin/env bash
# Megatron-LM's trainer (SCRIPT: pretrain_gpt.py, or pretrain_hybrid.py for a hybrid stack) on a converted checkpoint with the model's recipe: `mbridge recipe`
# gives the model flags for the recipe's layout and the training flags (docs/recipes.md). Called
# by examples/models/<org>/<model>/slurm_sft.sh (and slurm_peft.sh), which set MODEL, MODE, GPUS
# and GPU_MEMORY; run it with sbatch (one task per node), or with bash on one node.
#   MEGATRON_LM   a Megatron-LM checkout (pretrain_gpt.py); CKPT the `mbridge convert import` output
#   DATA_PATH     SFT: a jsonl of {"messages": [...]}; pretrain: an indexed dataset prefix
#   SAVE          where the trainer saves (default: $CKPT-$MODE)
#   MBRIDGE_EXAMPLE_MODEL  an HF directory to use instead of MODEL for the tokenizer (the recipe and
#                          its model flags stay MODEL's: a local copy of the same model)
#   MBRIDGE_EXAMPLE_DRY_RUN=1  print the launch command instead of running it (CI)
set -euo pipefail
SRC=${MBRIDGE_EXAMPLE_MODEL:-$MODEL}
SCRIPT=${SCRIPT:-pretrain_gpt.py}
MBRIDGE=${MBRIDGE:-mbridge}
if [ "$MODE" = peft ]; then
  # the LoRA settings are the recipe's, but pretrain_gpt.py has no adapter path to give them to
  $MBRIDGE recipe "$MODEL" --mode peft --gpus "$GPUS" --gpu-memory "$GPU_MEMORY" --json
  echo "slurm_peft.sh: Megatron-LM's pretrain_gpt.py has no LoRA (PEFT) path at d98e8a64dd; the recipe" \
       "above (layout, schedule, adapter rank and targets) is for a trainer that has one (docs/recipes.md)" >&2
  exit 3
fi
DRY=${MBRIDGE_EXAMPLE_DRY_RUN:-}
if [ -n "$DRY" ]; then
  MEGATRON_LM=${MEGATRON_LM:-/path/to/Megatron-LM} CKPT=${CKPT:-/path/to/ckpt} DATA_PATH=${DATA_PATH:-/path/to/data}
fi
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}" "${CKPT:?set CKPT to the mbridge convert import output}"
: "${DATA_PATH:?set DATA_PATH to the training data}"
SAVE=${SAVE:-$CKPT-$MODE}
FLAGS=$($MBRIDGE recipe "$MODEL" --mode "$MODE" --gpus "$GPUS" --gpu-memory "$GPU_MEMORY" --one-line)
NODES=${SLURM_NNODES:-1}
MASTER=${MASTER_ADDR:-$( [ -n "${SLURM_JOB_NODELIST:-}" ] && scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1 || hostname)}
if [ "$MODE" = sft ]; then
  DATA=(--tokenizer-type SFTTokenizer --tokenizer-model "$SRC" --sft-tokenizer-prompt-format default)
else
  DATA=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$SRC")
fi
# shellcheck disable=SC2086  # FLAGS is a list of flags
CMD=(torchrun --nnodes "$NODES" --nproc-per-node "$((GPUS / NODES))" --rdzv-backend c10d
     --rdzv-endpoint "$MASTER:29500" "$MEGATRON_LM/$SCRIPT" $FLAGS "${DATA[@]}" --data-path "$DATA_PATH"
     --load "$CKPT" --finetune --no-load-optim --no-load-rng --save "$SAVE" --save-interval 500
     --eval-interval 500 --eval-iters 10 --log-interval 10)
if [ -n "$DRY" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
if [ -n "${SLURM_JOB_ID:-}" ]; then exec srun --ntasks-per-node=1 "${CMD[@]}"; else exec "${CMD[@]}"; fi
