"""The work of the generalization study, pure PyTorch + gmpq_core (no Ray, testable alone).

``prepare_models(cfg, study_dir)`` trains, once, the FP target model on the full target training
split and one FP teacher per proxy, each cached at ``<study_dir>/cache/*.pt`` (atomic writes,
reused when present). ``run_cell(cell, cfg, paths)`` does one grid cell:

    policy = search on the proxy (teacher = that proxy's FP model)  |  uniform  |  random
    model  = finetune(target FP model, policy, FULL target train, fixed recipe, seed = cell seed)
    row    = target top-1/top-5 on the target test set, BitOPs (quantized-layer and whole-model
             conventions), search seconds, proxy-side top-1 and ARD, target-side ARD

Target-side ARD = mean over ``ard_images`` target test images of 1 - Spearman(Grad-CAM of the
fine-tuned model, Grad-CAM of the FP target model) (METHOD.md 4.3), comparable across methods.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from gmpq_core.attribution import find_feature_layer, gradcam
from gmpq_core.bitops import layer_macs
from gmpq_core.data import load_dataset, make_loader, proxy
from gmpq_core.derive import LayerChoice, select_bits
from gmpq_core.fileio import load_checkpoint, save_checkpoint
from gmpq_core.finetune import finetune
from gmpq_core.layers import fingerprint, searchable_layers
from gmpq_core.losses import rank_distance
from gmpq_core.models import build_model, model_file_tag, model_source_key
from gmpq_core.policy import BitCandidates, BitPolicy
from gmpq_core.precision import resolve_precision
from gmpq_core.search import search_policy
from gmpq_core.train import TrainConfig, seeded, train_fp

from .generalization import SEARCHED, TARGET_PROXY, FPRecipe, StudyConfig, uniform_bits

__all__ = ["model_jobs", "cached_model_path", "train_model_job", "prepare_models", "load_model_file", "random_policy", "run_cell", "target_ard", "ROW_KEYS"]

log = logging.getLogger(__name__)

ROW_KEYS = ("cell_id", "method", "proxy", "budget", "seed", "target_top1", "target_top5", "bitops_quantized",
            "bitops_total", "budget_bitops", "gbitops_quantized", "gbitops_total", "avg_w_bits", "avg_a_bits",
            "search_seconds", "finetune_seconds", "cell_seconds", "proxy_top1", "proxy_ard", "target_ard", "p",
            "policy_json")


def _device(cfg: StudyConfig) -> str:
    return "cuda" if cfg.resources["gpu"] > 0 and torch.cuda.is_available() else "cpu"


def _fresh(cfg: StudyConfig, info: Any, seed: int = 0) -> nn.Module:
    with seeded(seed):
        return build_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                           small_input=cfg.small_input, input_size=info.image_size)


def _cache_key(cfg: StudyConfig, dataset: str, size: int | None, recipe: FPRecipe) -> dict[str, Any]:
    return {"model": cfg.model, "dataset": dataset, "size": size, "proxy_seed": cfg.proxy_seed,
            "image_size": cfg.image_size, "small_input": cfg.small_input, "recipe": vars(recipe),
            **model_source_key(cfg.model)}


def cached_model_path(cfg: StudyConfig, job: tuple[str, str, int | None, FPRecipe], study_dir: str | Path) -> Path:
    """``<study_dir>/cache/<model>-<dataset>-<size>-<hash of everything the model depends on>.pt``."""
    _, dataset, size, recipe = job
    digest = hashlib.sha256(json.dumps(_cache_key(cfg, dataset, size, recipe), sort_keys=True).encode()).hexdigest()
    return Path(study_dir) / "cache" / f"{model_file_tag(cfg.model)}-{dataset}-{size or 'all'}-{digest[:12]}.pt"


def _train_cached(cfg: StudyConfig, dataset: str, size: int | None, recipe: FPRecipe, path_dir: Path,
                  device: str) -> Path:
    """Train (or reuse) an FP model on ``size`` stratified images of ``dataset``; returns its file."""
    key = _cache_key(cfg, dataset, size, recipe)
    path = cached_model_path(cfg, ("", dataset, size, recipe), path_dir.parent)
    if path.is_file():
        return path
    bundle = load_dataset(dataset, root=cfg.data_root, image_size=cfg.image_size)
    split = proxy(bundle.train, size, cfg.proxy_seed)
    loader = make_loader(split, bundle.info, batch_size=recipe.batch_size, train=True, seed=0, device=device)
    epochs = max(1, math.ceil(recipe.steps / len(loader)))
    per_epoch = min(len(loader), math.ceil(recipe.steps / epochs))
    model = _fresh(cfg, bundle.info)
    test = make_loader(proxy(bundle.test, min(len(bundle.test), cfg.proxy_eval_size or len(bundle.test)), 0),
                       bundle.info, batch_size=500, train=False, device=device)
    res = train_fp(model, loader, test, device=device, precision=cfg.precision,
                   config=TrainConfig(epochs=epochs, lr=recipe.lr, batch_size=recipe.batch_size,
                                      max_steps_per_epoch=per_epoch))
    meta = {**key, "top1": res.top1, "seconds": res.seconds, "steps": epochs * per_epoch,
            "precision": resolve_precision(cfg.precision, device)}    # recorded, not keyed: rounding, not recipe
    save_checkpoint(path, {"state_dict": model.cpu().state_dict(), "meta": meta})
    log.info("FP %s on %s[%s]: top-1 %.2f%% in %.0f s -> %s", cfg.model, dataset, size, res.top1, res.seconds, path)
    return path


def model_jobs(cfg: StudyConfig) -> list[tuple[str, str, int | None, FPRecipe]]:
    """The shared FP models the study needs: (key, dataset, size, recipe); key ``target`` = the target
    model on the full target training split, then one teacher per proxy (key = proxy name)."""
    jobs = [(TARGET_PROXY, cfg.target, None, cfg.target_fp)]
    if any(m in cfg.methods for m in ("gmpq", "gmpq_fixed_p3", "eta0")):
        for p in cfg.proxies:
            full_target = p.dataset == cfg.target and p.size is None
            jobs.append((p.name, p.dataset, p.size, cfg.target_fp if full_target else cfg.teacher))
    return jobs


def train_model_job(cfg: StudyConfig, job: tuple[str, str, int | None, FPRecipe], study_dir: str | Path) -> str:
    """Train (or reuse from ``<study_dir>/cache``) one shared FP model; returns its file."""
    _, dataset, size, recipe = job
    return str(_train_cached(cfg, dataset, size, recipe, Path(study_dir) / "cache", _device(cfg)))


def prepare_models(cfg: StudyConfig, study_dir: str | Path, *, map_fn: Any = None) -> dict[str, str]:
    """Paths of the FP target model (key ``target``) and of each proxy's FP teacher (key = proxy name).

    ``map_fn(fn, jobs) -> list`` runs the independent trainings (default: one after the other; the
    Ray runner passes a parallel one)."""
    jobs = model_jobs(cfg)
    fn = lambda job: train_model_job(cfg, job, study_dir)  # noqa: E731
    paths = (map_fn or (lambda f, xs: [f(x) for x in xs]))(fn, jobs)
    return {job[0]: path for job, path in zip(jobs, paths)}


def shared_models_summary(paths: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Top-1, SGD steps and training seconds of each shared FP model (from its file's meta), to keep
    beside the rows: a run on a lent machine brings back the rows, not the model cache."""
    out = {}
    for name, path in paths.items():
        meta = load_checkpoint(path).get("meta", {})
        out[name] = {k: meta.get(k) for k in ("top1", "steps", "seconds")}
    return out


def load_model_file(cfg: StudyConfig, path: str, info: Any, device: str) -> tuple[nn.Module, dict]:
    ckpt = load_checkpoint(path)
    model = _fresh(cfg, info)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), dict(ckpt.get("meta", {}))


def random_policy(model: nn.Module, macs: Mapping[str, int], candidates: BitCandidates, budget_bitops: int,
                  seed: int, *, fill: bool = False) -> BitPolicy:
    """Random architecture probabilities per layer (uniform(0,1), normalised; torch.Generator(seed)),
    then the same argmax + budget repair (+ optional fill) as a searched policy (gmpq_core.derive)."""
    g = torch.Generator().manual_seed(10_007 + int(seed))
    choices = []
    for name in searchable_layers(model):
        pw = torch.rand(len(candidates.w_bits), generator=g)
        pa = torch.rand(len(candidates.a_bits), generator=g)
        choices.append(LayerChoice(name=name, macs=int(macs[name]), w_bits=candidates.w_bits,
                                   a_bits=candidates.a_bits, pw=(pw / pw.sum()).tolist(), pa=(pa / pa.sum()).tolist()))
    layers = select_bits(choices, budget_bitops, fill=fill)
    return BitPolicy(layers=layers, fingerprint=fingerprint(model),
                     meta={"kind": "random", "seed": int(seed), "budget_bitops": int(budget_bitops)})


@torch.no_grad()
def _first_images(loader: Any, n: int) -> torch.Tensor:
    xs, have = [], 0
    for x, _ in loader:
        xs.append(x)
        have += x.shape[0]
        if have >= n:
            break
    return torch.cat(xs)[:n]


def target_ard(model: nn.Module, reference: nn.Module, x: torch.Tensor, layer: str, *, chunk: int = 128) -> float:
    """Mean over images of 1 - Spearman(Grad-CAM(model), Grad-CAM(reference)) on ``x`` [N, C, H, W]."""
    model.eval()
    reference.eval()
    total, n = 0.0, 0
    for lo in range(0, x.shape[0], chunk):
        xb = x[lo:lo + chunk]
        _, a = gradcam(model, xb, layer, mode="detached")
        _, b = gradcam(reference, xb, layer, mode="detached")
        total += rank_distance(a, b) * xb.shape[0]
        n += xb.shape[0]
    return total / n if n else float("nan")


def run_cell(cell: Mapping[str, Any], cfg: StudyConfig, paths: Mapping[str, str], *,
             reporter: Any = None) -> dict[str, Any]:
    """One cell of the grid -> one result row (keys ``ROW_KEYS``; NaN where a method has no value)."""
    t0 = time.perf_counter()
    device = _device(cfg)
    method, budget, seed = cell["method"], float(cell["budget"]), int(cell["seed"])
    target = load_dataset(cfg.target, root=cfg.data_root, image_size=cfg.image_size)
    info = target.info
    fp, _ = load_model_file(cfg, paths[TARGET_PROXY], info, device)
    all_macs = layer_macs(fp, info.image_size, info.in_channels)
    macs = {n: all_macs[n] for n in searchable_layers(fp)}
    budget_bitops = int(round(sum(macs.values()) * budget * budget))
    row: dict[str, Any] = {**{k: cell[k] for k in ("cell_id", "method", "proxy", "budget", "seed")},
                           "search_seconds": 0.0, "proxy_top1": math.nan, "proxy_ard": math.nan, "p": math.nan,
                           "budget_bitops": budget_bitops}
    if method in SEARCHED:
        sc = cfg.search_config(method, budget, seed)
        spec = cfg.proxy(cell["proxy"])
        pbundle = load_dataset(spec.dataset, root=cfg.data_root, image_size=cfg.image_size)
        split = proxy(pbundle.train, spec.size, cfg.proxy_seed)
        teacher = fp if cell["proxy"] == TARGET_PROXY else load_model_file(cfg, paths[cell["proxy"]], info, device)[0]
        loader = make_loader(split, pbundle.info, batch_size=sc.batch_size, train=True, seed=seed, device=device)
        n_eval = len(pbundle.test) if cfg.proxy_eval_size is None else min(cfg.proxy_eval_size, len(pbundle.test))
        eval_loader = make_loader(proxy(pbundle.test, n_eval, cfg.proxy_seed), pbundle.info, batch_size=500,
                                  train=False, device=device)
        res = search_policy(teacher, loader, config=sc, input_size=info.image_size, in_channels=info.in_channels,
                            eval_loader=eval_loader, reporter=reporter, device=device, model_name=cfg.model,
                            precision=cfg.precision)
        policy = res.policy
        row.update(search_seconds=res.search_seconds, proxy_top1=res.proxy_top1, proxy_ard=res.ard, p=res.p)
    elif method == "uniform":
        w, a = uniform_bits(cfg.candidates, budget)
        policy = BitPolicy.uniform(fp, w, a)
    elif method == "random":
        fill = bool(cfg.search.get("fill_budget", False))
        policy = random_policy(fp, macs, cfg.candidates, budget_bitops, seed, fill=fill)
    else:  # guarded by StudyConfig
        raise ValueError(method)
    ft_cfg = cfg.finetune_config(seed)
    train_loader = make_loader(target.train, info, batch_size=ft_cfg.batch_size, train=True, seed=seed, device=device)
    test_split = proxy(target.test, cfg.test_size, cfg.proxy_seed) if cfg.test_size else target.test
    test_loader = make_loader(test_split, info, batch_size=500, train=False, device=device)
    ft = finetune(fp, policy, train_loader, test_loader, config=ft_cfg, input_size=info.image_size,
                  in_channels=info.in_channels, device=device, precision=cfg.precision)
    ard = math.nan
    if cfg.ard_images > 0:
        layer = find_feature_layer(fp, model_name=cfg.model, input_size=info.image_size, in_channels=info.in_channels)
        ard = target_ard(ft.model, fp, _first_images(test_loader, cfg.ard_images), layer)
    w_avg, a_avg = policy.average_bits()
    row.update(target_top1=ft.top1, target_top5=ft.top5, bitops_quantized=int(ft.bitops.bitops_quantized),
               bitops_total=int(ft.bitops.bitops_total), gbitops_quantized=ft.bitops.bitops_quantized / 1e9,
               gbitops_total=ft.bitops.bitops_total / 1e9, avg_w_bits=w_avg, avg_a_bits=a_avg,
               finetune_seconds=ft.seconds, target_ard=ard, policy_json=policy.to_json(),
               cell_seconds=time.perf_counter() - t0)
    if row["bitops_quantized"] > budget_bitops:
        log.warning("cell %s: policy %d BitOPs exceeds the budget %d", cell["cell_id"], row["bitops_quantized"],
                    budget_bitops)
    return {k: row.get(k, math.nan) for k in ROW_KEYS}

