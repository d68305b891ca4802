# Session 21 scratch (not a benchmark): does starting Ray overlap with importing the heavy modules?
#   seq:    import torch/torchvision/ray.tune/optuna/mlflow/pyarrow, then ray.init (what gmpq does)
#   thread: ray.init in a thread while the main thread imports them (failed: the thread's ray.init could not
#           reach its GCS within 60 s, 4 of 4 runs)
#   rev:    ray.init in the main thread while a thread imports them
# Run each mode in a fresh process, alternated: python ray_init_overlap.py (seq|thread|rev)
import sys
import threading
import time

t0 = time.perf_counter()
mode = sys.argv[1]
import ray  # noqa: E402


def init():
    ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False, logging_level=40,
             object_store_memory=200 * 1024**2)


def imports():
    import mlflow, optuna, pyarrow.parquet, torch, torchvision  # noqa: F401, E401
    from ray import tune  # noqa: F401


if mode == "rev":
    th = threading.Thread(target=imports)
    th.start()
    init()
    th.join()
elif mode == "thread":
    th = threading.Thread(target=init)
    th.start()
    imports()
    th.join()
else:
    imports()
    init()


@ray.remote
def f():
    return 1


ray.get(f.remote())
print(f"{mode}: first Ray task after {time.perf_counter() - t0:.2f} s")
ray.shutdown()
