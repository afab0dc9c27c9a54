#!/usr/bin/env bash
# Megatron-LM's pretrain_gpt.py with `mbridge megatron-args` flags on one GPU (the `run` tool of
# this workplace; docs/megatron-lm.md): loads an `mbridge convert import` checkpoint strictly
# (--dist-ckpt-strictness raise_all), runs 3 steps at lr 0, saves; the log and the saved
# checkpoint come back in $OUT, to export here with --hf-source and compare bit-exactly.
# Prepared here, in .whl/trainer/ (carried with .whl):
#   mlm.tar.gz   git archive of NVIDIA/Megatron-LM (megatron pretrain_gpt.py gpt_builders.py model_provider.py)
#   hf/          a toy HF checkpoint;  meg/  `mbridge convert import --hf hf --out meg --tp 1`
#   model.args   `mbridge megatron-args hf --one-line`
# and the megatron-core wheel in .whl/ (its compiled dataset helpers are copied into the tree).
set -u
T=$PWD/.whl/trainer  # see above
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
mkdir -p /tmp/mlm && tar -xzf $T/mlm.tar.gz -C /tmp/mlm
cp /tmp/site/megatron/core/datasets/helpers_cpp*.so /tmp/mlm/megatron/core/datasets/ 2>/dev/null
cd /tmp/mlm && export PYTHONPATH=/tmp/mlm:/tmp/site CUDA_DEVICE_MAX_CONNECTIONS=1
timeout 400 torchrun --nproc-per-node 1 pretrain_gpt.py $(cat $T/model.args) \
  --load $T/meg --no-load-optim --no-load-rng --dist-ckpt-strictness raise_all \
  --mock-data --tokenizer-type NullTokenizer --micro-batch-size 2 --global-batch-size 2 --seq-length 32 \
  --train-iters 3 --eval-interval 1000 --eval-iters 0 --lr 0.0 --min-lr 0.0 --lr-decay-style constant \
  --weight-decay 0.0 --save /tmp/saved --save-interval 3 --log-interval 1 --seed 1234 > $OUT/train.log 2>&1
echo "trainer exit $?"
tail -25 $OUT/train.log
ls -R /tmp/saved | head -20
tar -czf $OUT/saved.tar.gz -C /tmp saved 2>/dev/null; ls -la $OUT
