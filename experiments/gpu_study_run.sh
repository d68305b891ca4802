#!/usr/bin/env bash
# One prepared GPU run of the short generalization study (issue 8) on a lent machine without Ray or
# MLflow: checks the card and the carried Fashion-MNIST files, then runs the cells in grid order until
# MINUTES would be exceeded (every finished row is kept; a rerun with the same OUT resumes).
#   bash experiments/gpu_study_run.sh [OUT] [MINUTES] [CONFIG]
# Carry the dataset with the command (gitignored): data/FashionMNIST/raw/*-ubyte.gz (about 30 MB).
# Bring back rows.jsonl, study.parquet, study_timing.json and study_config.yaml, not OUT/cache (the shared
# FP models, tens of MB: over the device tool's 16 MB per file; their top-1 is in study_timing.json).
# Afterwards, on the build machine: gmpq study --out OUT --analyze-only --report docs/results_gpu.md
set -u -o pipefail
OUT=${1:-${OUT:-runs/study_gpu}}
MINUTES=${2:-6}
CONFIG=${3:-experiments/generalization_gpu_short.yaml}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only')"
} 2>&1 | tee "$OUT/machine.txt"
if ! ls data/FashionMNIST/raw/train-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "gpu_study_run: data/FashionMNIST/raw is missing: carry it with the command (run(carry=['data']))" >&2
  exit 2
fi
$PY -m experiments.generalization_local --config "$CONFIG" --out "$OUT" --minutes "$MINUTES" 2>&1 \
  | grep --line-buffered -v -E "^(STAGE|USDT|\[W)" | tee "$OUT/run.log"
rc=$?
ls -la "$OUT"
exit $rc
