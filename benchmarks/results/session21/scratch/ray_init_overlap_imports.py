# Session 21 scratch (not a benchmark): ray.init in the main thread while a thread imports torch/tune/optuna/mlflow.
# Compare with ray_init_overlap_thread.py seq (sequential) alternately, in fresh processes.
import time, threading
t0 = time.perf_counter()
import ray
def imports():
    import torch, torchvision  # noqa
    from ray import tune  # noqa
    import optuna, mlflow, pyarrow.parquet  # noqa
th = threading.Thread(target=imports); th.start()
ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False, logging_level=40, object_store_memory=200*1024**2)
t_init = time.perf_counter() - t0
th.join()
t_imp = time.perf_counter() - t0
@ray.remote
def f(): return 1
ray.get(f.remote())
t_task = time.perf_counter() - t0
ray.shutdown()
print(f"rev: ready {t_init:.2f} imports {t_imp:.2f} first task {t_task:.2f}")
