import sys, time, os
os.environ["RAY_USAGE_STATS_ENABLED"]="0"
import ray
mode = sys.argv[1]
ENV = {"env_vars": {"PL_DISABLE_FORK": "1"}}
kw = dict(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
if mode == "job":
    kw["runtime_env"] = ENV
t0=time.perf_counter()
ray.init(**kw)
t1=time.perf_counter()
time.sleep(3)  # like driver prep
opts = {} if mode == "none" else {"runtime_env": ENV}
@ray.remote(num_cpus=1)
class A:
    def ping(self):
        import torch  # noqa: F401 (the import is what is timed)
        return os.getpid()
ts=[]
for i in range(2):
    t=time.perf_counter()
    a = A.options(**opts).remote()
    ray.get(a.ping.remote())
    ts.append(time.perf_counter()-t)
print(mode, "init %.2f"%(t1-t0), "actors", ["%.2f"%x for x in ts])
t=time.perf_counter(); ray.shutdown(); print("stop %.2f"%(time.perf_counter()-t))
