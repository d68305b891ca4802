"""bench_sweep with Tune's default trial-actor env vars cleared (so trial actors can use prestarted workers)."""
import os, sys, runpy
if os.environ.get("CLEAR_TUNE_ENV") == "1":
    import ray.tune.execution.class_cache as cc
    cc.DEFAULT_ENV_VARS.clear()
sys.argv = ["bench_sweep.py"] + sys.argv[1:]
runpy.run_path("/work/main/benchmarks/bench_sweep.py", run_name="__main__")
