# Session 21 scratch (not a benchmark): ray.init in a thread while the main thread imports torch/tune/optuna/mlflow.
# Failed: the thread's ray.init could not reach its GCS within 60 s. Usage: python THIS (thread|seq)
import sys, time, threading
t0 = time.perf_counter()
mode = sys.argv[1]
import ray
t_ray = time.perf_counter() - t0
def init():
    ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False, logging_level=40, object_store_memory=200*1024**2)
th = None
if mode == "thread":
    th = threading.Thread(target=init); th.start()
import torch, torchvision  # noqa
from ray import tune  # noqa
import optuna, mlflow, pyarrow.parquet  # noqa
t_imp = time.perf_counter() - t0
if mode == "thread":
    th.join()
else:
    init()
t_init = time.perf_counter() - t0
@ray.remote
def f(): return 1
ray.get(f.remote())
t_task = time.perf_counter() - t0
ray.shutdown()
print(f"{mode}: import ray {t_ray:.2f} imports {t_imp:.2f} ready {t_init:.2f} first task {t_task:.2f}")
