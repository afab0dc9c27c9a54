#!/usr/bin/env bash
# GPU rows for chosen models (the `run` tool, 1 x H200), in the environment that works there:
# first with every wheel in .whl/ (transformers as on the CPU machine), else with megatron-core
# and syrupy only (the GPU machine's transformers); a one-model smoke run decides and its tail is
# printed. Then `gpu_conformance.py run` on MODELS and the mutants of ONLY (a bridge-ref substring).
#   MODELS="a/b c/d" ONLY=nemotron_h bash scripts/device_rows.sh    (MODELS=ALL: every fixture model)
# MAMBA_SSM=1: mamba_ssm's Triton kernels installed first (the package of its sdist in
# .whl/kernels/; its CUDA extensions are not built: Megatron's MambaMixer and HF's NemotronH call
# none of them, only the package's __init__ imports Mamba-1's, so an empty module stands in for
# it), with einops from .whl/. TAG names the reports (report-rows-TAG.json) when run twice.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
W=$PWD/.whl; R=/tmp/res; mkdir -p $R /tmp/mb /tmp/empty
tar -xzf $W/src.tar.gz -C /tmp/mb
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/siteA $W/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/siteB $W/megatron_core*.whl $W/syrupy*.whl >/dev/null 2>&1
smoke() { cd /tmp/empty && PYTHONPATH=$1:/tmp/mb timeout 150 python3 -m pytest -p pytest_mbridge.plugin -p no:cacheprovider \
  --mbridge-model=${SMOKE:-Qwen/Qwen3-0.6B} --run-gpu -x -q -W ignore > $R/smoke-$(basename $1).log 2>&1; r=$?; tail -30 $R/smoke-$(basename $1).log; return $r; }
# SITE=/tmp/siteA (or B) given: that environment without the smoke run (a second call in one session)
[ -z "${SITE:-}" ] && { SITE=/tmp/siteA; smoke /tmp/siteA || { SITE=/tmp/siteB; smoke /tmp/siteB; }; }
echo "environment: $SITE"
if [ -n "${MAMBA_SSM:-}" ]; then
  mkdir -p /tmp/kern && tar -xzf $W/kernels/mamba_ssm-*.tar.gz -C /tmp/kern && cp -r /tmp/kern/mamba_ssm-*/mamba_ssm $SITE/ \
    && echo '"""mamba_ssm CUDA extension: not built"""' > $SITE/selective_scan_cuda.py
  python3 -m pip install -q --no-index --no-deps --target $SITE $W/einops*.whl >/dev/null 2>&1
fi
cd /tmp/mb; export PYTHONPATH=$SITE:/tmp/mb
python3 -c 'import torch,transformers;print(torch.__version__,transformers.__version__)' | tee $R/env${TAG:+-$TAG}.txt
python3 -c 'from bridges.models.qwen3_next.modeling_qwen3_next import gdn_path; from bridges.models.nemotron_h.modeling_nemotron_h import mamba_path as m
from transformers.utils.import_utils import is_flash_linear_attention_available as f; print("fla installed:", gdn_path() == "fla", "(HF uses it:", f(), "); Megatron gated delta rule: torch (deterministic mode); mamba-2:", m())' 2>&1 | tail -1 | tee -a $R/env${TAG:+-$TAG}.txt
args=(); for m in ${MODELS:-}; do [ "$m" != ALL ] && args+=("--mbridge-model=$m"); done  # ALL: the registry
[ -n "${MODELS:-}" ] && timeout ${ROWS_TIMEOUT:-240} python3 scripts/gpu_conformance.py run --out $R/report-rows${TAG:+-$TAG}.json "${args[@]}" > $R/rows${TAG:+-$TAG}.log 2>&1
echo "rows: exit $?"; tail -5 $R/rows${TAG:+-$TAG}.log
[ -n "${ONLY:-}" ] && timeout ${MUTANTS_TIMEOUT:-150} python3 scripts/gpu_conformance.py mutants --out $R/mutants-rows.json -j 10 --timeout 140 --only "$ONLY" > $R/mutants.log 2>&1
echo "mutants: exit $?"; tail -20 $R/mutants.log
tar -czf $OUT/rows.tar.gz -C $R .
