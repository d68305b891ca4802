#!/usr/bin/env bash
# Before a new virtual environment is installed: refuse early, with the numbers, when the disk
# cannot hold it. PyTorch from PyPI is a CUDA build on x86_64 (~6.5 GB in the venv); a disk that
# fills halfway through pip leaves a broken venv and only "No space left on device" to go on.
set -euo pipefail
venv=${1:?usage: check_disk.sh VENV [NEED_GB]}
need_gb=${2:-7}
[ -x "$venv/bin/python" ] && exit 0   # an existing venv is only updated: no check
mkdir -p "$(dirname "$venv")"
dir=$(cd "$(dirname "$venv")" && pwd)
free_kb=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
[ -n "$free_kb" ] || exit 0
if [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
  free_gb=$(awk -v k="$free_kb" 'BEGIN {printf "%.1f", k / 1048576}')
  echo "make: the new virtual environment $venv needs about $need_gb GB of free disk (PyTorch from" \
       "PyPI is a CUDA build of ~6.5 GB), but only $free_gb GB are free on the disk holding $dir." \
       "Free some space (old clones and their .venv folders are the usual culprits), or put the" \
       "environment on a larger disk with 'make VENV=/path/to/venv ...' (VENV_NEED_GB=N sets the need)." >&2
  exit 1
fi
