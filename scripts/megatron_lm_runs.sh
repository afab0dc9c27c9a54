#!/usr/bin/env bash
# Megatron-LM's trainer on one GPU for every case prepared by scripts/megatron_lm_cases.py (the
# `run` tool of this workplace; docs/megatron-lm.md), all at once (each its own torchrun and port):
# pretrain_gpt.py with the case's `mbridge megatron-args` flags loads the converted toy strictly
# (--dist-ckpt-strictness raise_all), runs 3 steps at lr 0 and saves; then the memory case: a
# full-size model from its pretrain recipe's flags (random init, mock data, 3 steps at a global
# batch of 2 micro-batches, beside the toys) for the peak memory Megatron-LM reports. Everything comes back in
# $OUT/trainer-logs.tar.gz (<case>/train.log) and $OUT/saved-<case>.tar.gz (SAVE_ARGS: e.g. --no-save-optim). Needs in .whl/: the megatron-core wheel
# (its compiled dataset helpers), trainer/mlm.tar.gz (git archive of NVIDIA/Megatron-LM: megatron,
# pretrain_gpt.py, gpt_builders.py, model_provider.py) and src.tar.gz (this project: --spec modules).
set -u
W=$PWD/.whl; T=$W/trainer; R=/tmp/trainer; mkdir -p $R /tmp/mlm /tmp/mb
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $W/*.whl >/dev/null 2>&1
tar -xzf $T/mlm.tar.gz -C /tmp/mlm && tar -xzf $W/src.tar.gz -C /tmp/mb
cp /tmp/site/megatron/core/datasets/helpers_cpp*.so /tmp/mlm/megatron/core/datasets/ 2>/dev/null
cd /tmp/mlm && export PYTHONPATH=/tmp/mlm:/tmp/site:/tmp/mb CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONWARNINGS=ignore
RUN="--mock-data --tokenizer-type NullTokenizer --eval-interval 1000 --eval-iters 0 --log-interval 1 --seed 1234"
port=29600
for c in $T/cases/*/; do
  n=$(basename $c); mkdir -p $R/$n; port=$((port + 1))
  eval "A=($(cat $c/model.args) $(cat $c/extra.args 2>/dev/null))"  # extra.args: the case's own run flags
  S=$(cat $c/script 2>/dev/null || echo pretrain_gpt.py)  # pretrain_hybrid.py for a hybrid stack
  ( t0=$SECONDS; timeout ${CASE_TIMEOUT:-240} torchrun --nproc-per-node 1 --master-port $port $S "${A[@]}" \
      --load $c/meg --no-load-optim --no-load-rng --dist-ckpt-strictness raise_all $RUN \
      --micro-batch-size 2 --global-batch-size 2 --seq-length 32 --train-iters 3 --lr 0.0 --min-lr 0.0 \
      --lr-decay-style constant --weight-decay 0.0 --save $R/$n/saved --save-interval 3 ${SAVE_ARGS:-} > $R/$n/train.log 2>&1
    echo "$n: exit $? in $((SECONDS - t0)) s" >> $R/status.txt ) &
done
if [ -f $T/memory/recipe.args ]; then  # beside the toys: the peak is the process's own (Megatron-LM's report)
  mkdir -p $R/memory; cp $T/memory/recipe.json $R/memory/; eval "A=($(cat $T/memory/recipe.args))"
  ( t0=$SECONDS; timeout ${MEMORY_TIMEOUT:-240} torchrun --nproc-per-node 1 --master-port 29700 pretrain_gpt.py "${A[@]}" \
      $RUN --global-batch-size 2 --train-iters 3 --lr-warmup-iters 0 > $R/memory/train.log 2>&1
    echo "memory: exit $? in $((SECONDS - t0)) s" >> $R/status.txt ) &
fi
wait
# logs in one file, each case's saved checkpoint in its own (the files that come back are <= 16 MiB)
tar -czf $OUT/trainer-logs.tar.gz -C /tmp --exclude saved trainer
for c in $R/*/saved; do n=$(basename $(dirname $c)); tar -czf $OUT/saved-$n.tar.gz -C $R $n/saved; done
cat $R/status.txt
for l in $R/*/train.log; do echo "== $l"; grep -E "successfully loaded|iteration +3/|\(after . iterations\) memory|Theoretical|Error" $l | head -6; done
