cd /work/main
for r in 1 2; do
  for side in on off; do
    if [ $side = off ]; then export RAY_prestart_worker_first_driver=0; else unset RAY_prestart_worker_first_driver; fi
    .venv/bin/python benchmarks/bench_sweep.py --cache-dir /tmp/gmpq_warm --json /tmp/abpre/${side}_$r.json > /tmp/abpre/${side}_$r.log 2>&1
  done
done
