"""GPU diagnostic (session 18): a whole ResNet-18 search's proxy top-1 with graphs off/auto, fp32/auto."""
import time
from gmpq_core.complexity import Budget
from gmpq_core.jobs import SearchJob, run_search_job
from gmpq_core.search_config import SearchConfig
for lr_arch in (3.0, 0.01):
    for graph in ("off", "auto"):
        for prec in ("fp32", "auto"):
            cfg = SearchConfig(budget=Budget(avg_bits=3.0), epochs=2, batch_size=256, lr_arch=lr_arch, seed=0,
                               cuda_graph=graph, recalibrate_bn_batches=4)
            job = SearchJob(model="resnet18", proxy_size=10000, device="cuda", search=cfg, eval_size=1000,
                            precision=prec)
            t = time.perf_counter(); r = run_search_job(job)
            h = [(round(e["proxy_top1"], 1), round(e.get("train_top1", -1), 1), round(e.get("ce", e.get("loss", -1)), 3)) for e in r.history]
            print(f"lr_arch={lr_arch} graph={graph:4} prec={prec:4} teacher={r.policy.meta['teacher_top1']} "
                  f"final_proxy={r.proxy_top1:.1f} hist(proxy,train,ce)={h} {time.perf_counter()-t:.1f}s", flush=True)
