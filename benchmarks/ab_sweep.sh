#!/usr/bin/env bash
# Side-by-side sweep benchmark of two commits: this checkout's bench_sweep.py (one accounting for both)
# runs the code of a worktree of OLD_REV and of this checkout, alternated ROUNDS times in one invocation
# (the machine's load drifts; alternating shares it). OLD_REV needs orchestrator.sweep.prepare_shared
# and orchestrator.ray_env.ray_session (the functions the benchmark times): 3e83f49 or later.
#   bash benchmarks/ab_sweep.sh OLD_REV OUT_DIR [ROUNDS] [bench_sweep.py args...]
# e.g. bash benchmarks/ab_sweep.sh 30f77c0 /tmp/ab 2 --cache-dir ~/.cache/gmpq     (warm model cache)
#      bash benchmarks/ab_sweep.sh 30f77c0 /tmp/ab 1                               (cold: fresh cache each run)
# Writes OUT_DIR/{old,new}_<round>.json and prints each run's summary, then the mean compute fractions.
set -euo pipefail
old_rev=${1:?OLD_REV}; out=${2:?OUT_DIR}; rounds=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
case $rounds in ''|*[!0-9]*|0) echo "ab_sweep.sh: ROUNDS must be a positive number, got '$rounds' (the bench_sweep.py arguments come after it)" >&2; exit 2;; esac
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
mkdir -p "$out"
wt=$(mktemp -d /tmp/gmpq_ab_old.XXXXXX)
trap 'git -C "$here" worktree remove --force "$wt" >/dev/null 2>&1 || true' EXIT
git -C "$here" worktree add --detach -q "$wt" "$old_rev"
for r in $(seq 1 "$rounds"); do
  for side in old new; do
    src=$([ "$side" = old ] && echo "$wt" || echo "$here")
    echo "== round $r: $side ($(git -C "$src" rev-parse --short HEAD))"
    # PYTHONPATH first: this side's packages win over the editable install, in the driver and in Ray's workers
    (cd "$src" && PYTHONPATH="$src" "$py" "$here/benchmarks/bench_sweep.py" --json "$out/${side}_$r.json" "$@")
  done
done
"$py" - "$out" "$rounds" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for side in ("old", "new"):
    rows = [json.load(open(f"{out}/{side}_{r}.json")) for r in range(1, rounds + 1)]
    for key, what in (("compute_fraction", "compute fraction (slots)"), ("core_compute_fraction", "counting cores")):
        cf = [row[key] for row in rows if row.get(key) is not None]
        if cf:
            print(f"{side}: {what} {', '.join(f'{100 * c:.1f}%' for c in cf)} (mean {100 * sum(cf) / len(cf):.1f}%)")
    print(f"{side}: wall {', '.join(str(row['wall_s']) for row in rows)} s")
PY
