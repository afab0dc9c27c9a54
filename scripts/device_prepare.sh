#!/usr/bin/env bash
# Builds .whl/ (ignored by git, carried to the `run` tool's GPU machine) from nothing, for
# scripts/device_rows.sh, scripts/megatron_lm_runs.sh and scripts/device_run.sh:
#   - wheels at this venv's versions: megatron-core, syrupy, einops (always needed there), and
#     transformers with what it imports (siteA: the CPU machine's transformers); hf_xet and
#     kernels are left out (imported lazily; 7 MB of the 64 MiB a call may carry);
#   - .whl/kernels/mamba_ssm-<v>.tar.gz (its sdist: MAMBA_SSM=1 in device_rows.sh);
#   - .whl/trainer/mlm.tar.gz: the Megatron-LM files the trainer runs need, from a git dir of
#     NVIDIA/Megatron-LM (MLM=<git dir> [MLM_COMMIT=d98e8a64dd]; the `fetch` tool gives one);
#   - .whl/trainer/cases/: the trainer cases CASES names ("name=org/model ..."; extra run flags
#     per case in EXTRA_<name>, e.g. EXTRA_kimi="--moe-router-bias-update-rate 0");
#   - .whl/src.tar.gz: this commit's tree (regenerate after every commit you want to run).
#   MLM=/work/.mirror/NVIDIA+Megatron-LM/repo CASES="kimi=moonshotai/Kimi-K2-Instruct" bash scripts/device_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
W=.whl; mkdir -p $W/kernels $W/trainer
ver() { $PY -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
   --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d $W"
pkgs=""
for p in megatron-core syrupy einops transformers huggingface_hub httpx2 httpcore2 truststore click typer tokenizers regex; do
  v=$(ver $p); [ -n "$v" ] && pkgs="$pkgs $p==$v"
done
$PY -m pip download -q $P $pkgs 2>&1 | grep -v "^WARNING" || true
mv=$(ver mamba_ssm || true); mv=${mv:-2.3.2.post1}
if ! ls $W/kernels/mamba_ssm-*.tar.gz >/dev/null 2>&1; then  # the sdist as is (its build needs CUDA)
  url=$(curl -s https://pypi.org/simple/mamba-ssm/ | grep -o "https://[^\"#]*mamba_ssm-$mv.tar.gz" | head -1)
  [ -n "$url" ] && curl -s -L -o $W/kernels/mamba_ssm-$mv.tar.gz "$url"
fi
if [ -n "${MLM:-}" ]; then
  files=$(git --git-dir "$MLM" ls-tree --name-only "${MLM_COMMIT:-d98e8a64dd}" | grep -E '^(megatron|pretrain_(gpt|hybrid|mamba)\.py|(gpt|hybrid|mamba)_builders\.py|model_provider\.py)$')
  git --git-dir "$MLM" archive "${MLM_COMMIT:-d98e8a64dd}" $files | gzip > $W/trainer/mlm.tar.gz
fi
for pair in ${CASES:-}; do
  PYTHONPATH=. $PY scripts/megatron_lm_cases.py prepare "$pair"
  n=${pair%%=*}; extra="EXTRA_$n"
  [ -n "${!extra:-}" ] && echo "${!extra}" > $W/trainer/cases/$n/extra.args
done
rm -rf /tmp/mb-src && mkdir /tmp/mb-src && git archive HEAD | tar -x -C /tmp/mb-src
git rev-parse --short HEAD > /tmp/mb-src/COMMIT && tar -czf $W/src.tar.gz -C /tmp/mb-src .
du -sh $W; ls $W $W/trainer/cases 2>/dev/null
