#!/usr/bin/env bash
# (Prepared as scripts/megatron_lm_run.sh says, plus: .whl/trainer/meg2 = `mbridge convert import --hf hf --out meg2`
# with the checkpoint args, and beside.args = `mbridge megatron-args hf --beside-checkpoint-args --one-line`.)
# Megatron-LM's pretrain_gpt.py on a converted checkpoint that carries its args: (A) with
# --use-checkpoint-args and only the flags it does not restore; (B) with every model flag but
# one wrong (--num-layers 3), which Megatron-LM's check of the saved args must refuse.
set -u
T=$PWD/.whl/trainer
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
mkdir -p /tmp/mlm && tar -xzf $T/mlm.tar.gz -C /tmp/mlm
cp /tmp/site/megatron/core/datasets/helpers_cpp*.so /tmp/mlm/megatron/core/datasets/ 2>/dev/null
cd /tmp/mlm && export PYTHONPATH=/tmp/mlm:/tmp/site CUDA_DEVICE_MAX_CONNECTIONS=1
RUN="--no-load-optim --no-load-rng --dist-ckpt-strictness raise_all --mock-data --tokenizer-type NullTokenizer
  --micro-batch-size 2 --global-batch-size 2 --seq-length 32 --train-iters 3 --eval-interval 1000 --eval-iters 0
  --lr 0.0 --min-lr 0.0 --lr-decay-style constant --weight-decay 0.0 --log-interval 1 --seed 1234"
t0=$SECONDS
timeout 200 torchrun --nproc-per-node 1 pretrain_gpt.py --use-checkpoint-args $(cat $T/beside.args) --load $T/meg2 \
  $RUN --save /tmp/saved2 --save-interval 3 > $OUT/trainA.log 2>&1
echo "A (use-checkpoint-args) exit $? at $((SECONDS - t0)) s"
grep -E "from checkpoint|iteration +3/|lm loss|Error|error" $OUT/trainA.log | head -40
WRONG=$(sed 's/--num-layers 4/--num-layers 3/' $T/model.args)
timeout 150 torchrun --nproc-per-node 1 pretrain_gpt.py $WRONG --load $T/meg2 $RUN > $OUT/trainB.log 2>&1
echo "B (a wrong --num-layers) exit $? at $((SECONDS - t0)) s"
grep -E "AssertionError|not equal" $OUT/trainB.log | head -5
tar -czf $OUT/saved2.tar.gz -C /tmp saved2 2>/dev/null; ls -la $OUT
