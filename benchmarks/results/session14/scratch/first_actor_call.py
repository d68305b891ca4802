# Scratch (session 14): time to a first actor call with no runtime env, with the Tune-like env_vars (and on the job too), or empty env_vars; output in first_actor_call.txt
import time, logging, sys, ray
RE = {"env_vars": {}} if len(sys.argv) > 2 else {"env_vars": {"PL_DISABLE_FORK": "1"}}
mode = sys.argv[1]
ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
         runtime_env=RE if mode in ("job+actor",) else None)
time.sleep(4)   # prestarted workers up
class A:
    def f(self):
        import os
        return os.getpid()
cls = ray.remote(runtime_env=RE)(A) if mode != "none" else ray.remote(A)
t = time.perf_counter()
a = cls.remote(); ray.get(a.f.remote())
print(mode, "first actor call", round(time.perf_counter() - t, 2))
ray.shutdown()
