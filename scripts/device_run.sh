#!/usr/bin/env bash
# One GPU-machine session (the `run` tool of this workplace, 1 x H200): the --run-gpu suite on
# every fixture model, the mutants under it, then the CPU benchmark on the host's CPUs with
# CUDA hidden. Runs from a source tarball (.whl/src.tar.gz: the commit's tree, see COMMIT in
# it), not the working copy. Results go to $OUT/results.tar.gz after every stage.
#   bash scripts/device_run.sh [stages: gpu mutants bench]
# Before the call, here: rm -rf /tmp/src && mkdir /tmp/src && git archive HEAD | tar -x -C /tmp/src
#   && cp scripts/* /tmp/src/scripts/ && git rev-parse --short HEAD > /tmp/src/COMMIT
#   && tar -czf .whl/src.tar.gz -C /tmp/src .     (then run it with carry [".whl"]; ~9 min)
# Every wheel in .whl/ is installed first: megatron-core and syrupy always; to run with the CPU
# machine's transformers (5.24) instead of the GPU machine's (5.17), add its wheel and those of
# huggingface_hub 2.4, httpx2, httpcore2, truststore and tokenizers (pip download --no-deps).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
stages=${*:-gpu mutants bench}
R=/tmp/res; mkdir -p $R /tmp/mb
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
tar -xzf .whl/src.tar.gz -C /tmp/mb || exit 1
cd /tmp/mb && export PYTHONPATH=/tmp/site:/tmp/mb
save() { tar -czf "$OUT/results.tar.gz" -C $R . ; }
{ date -u; cat COMMIT; nvidia-smi -L; nproc; python3 -c 'import torch,transformers;print(torch.__version__,transformers.__version__)'; } > $R/env.txt 2>&1
save
t0=$SECONDS
for s in $stages; do
  case $s in
    gpu) timeout 220 python3 scripts/gpu_conformance.py run --out $R/report-1gpu.json > $R/gpu.log 2>&1 ;;
    mutants) timeout ${MUTANTS_TIMEOUT:-330} python3 scripts/gpu_conformance.py mutants --out $R/mutants-1gpu.json -j 10 --timeout 240 ${MUTANTS_ARGS:-} > $R/mutants.log 2>&1 ;;
    bench) CUDA_VISIBLE_DEVICES= timeout 520 python3 scripts/bench_suite.py --save $R/bench \
             --machine "device host CPU (the H200 machine's host, CUDA hidden), x86_64, $(nproc) cores" > $R/bench.log 2>&1 ;;
  esac
  echo "$s: exit $? at $((SECONDS - t0)) s" | tee -a $R/stages.txt
  save
done
# the figures in the log as well (the command's output tail comes back even when files do not)
cat $R/stages.txt; tail -3 $R/gpu.log; sed -n '/^| run/,/^Target/p' /tmp/mb/docs/benchmarks.md 2>/dev/null
python3 scripts/gpu_conformance.py render --stdout --mutants $R/mutants-1gpu.json 2>&1 | sed -n '/^## Mutants/,$p'
