import sys, time, json, contextlib
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
STAMPS = []
def stamp(k): STAMPS.append((k, time.time()))
stamp("script")
import bench_sweep
import orchestrator.ray_env as ray_env
orig = ray_env.ray_session
@contextlib.contextmanager
def sess(*a, **k):
    stamp("ray_init_begin")
    with orig(*a, **k) as s:
        stamp("ray_init_end")
        try:
            yield s
        finally:
            stamp("ray_shutdown_begin")
    stamp("ray_shutdown_end")
ray_env.ray_session = sess
import ray.tune
of = ray.tune.Tuner.fit
def fit(self):
    stamp("fit_begin")
    try: return of(self)
    finally: stamp("fit_end")
ray.tune.Tuner.fit = fit
args = bench_sweep.parse_args(["--cache-dir", "/root/.cache/gmpq", "--out", sys.argv[1]])
stamp("run_begin")
res = bench_sweep.run_once(args, "parallel", 0.0)
stamp("run_end")
ev = [json.loads(l) for l in open(sys.argv[1] + "/trial_events.jsonl")]
for e in ev:
    if e["event"] in ("start", "end"): STAMPS.append((f"trial {e['event']} {e['trial_id']} pid{e['pid']}", e["time"]))
t0 = STAMPS[0][1]
for k, t in sorted(STAMPS, key=lambda x: x[1]): print(f"{t - t0:8.2f} {k}")
print(res["compute_fraction"], res["wall_s"])
