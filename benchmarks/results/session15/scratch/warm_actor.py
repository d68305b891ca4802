# Scratch (session 15): time to two first trial-actor calls (runtime env as Tune sets it) after ray.init; "warm": a task with the same runtime env imports torch + ray.tune first. Run with RAY_prestart_worker_first_driver=0/1. Output in warm_actor.txt
import time, logging, sys, ray
RE = {"env_vars": {"PL_DISABLE_FORK": "1"}}
mode = sys.argv[1]
t0 = time.perf_counter()
ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
print("init", round(time.perf_counter() - t0, 2))
if mode == "warm":
    @ray.remote(num_cpus=0, runtime_env=RE)
    def warm():
        import os, torch, ray.tune  # noqa
        return os.getpid()
    refs = [warm.remote() for _ in range(2)]
    print("warm pids", ray.get(refs), round(time.perf_counter() - t0, 2))
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.3)
@ray.remote(num_cpus=1, runtime_env=RE)
class A:
    def f(self):
        import os
        had = "torch" in sys.modules
        import torch, ray.tune  # noqa
        return os.getpid(), had
t = time.perf_counter()
acts = [A.remote() for _ in range(2)]
print(mode, ray.get([a.f.remote() for a in acts]), "first actor calls", round(time.perf_counter() - t, 2))
ray.shutdown()
