"""The shipped cluster configs parse and say what the README promises; the README's cost table is
recomputed from cluster.cost (so the two cannot drift apart)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from cluster.cost import CostInputs, estimate_gpu_hours

ROOT = Path(__file__).resolve().parents[2] / "cluster"


def test_launcher_yaml_validates_against_rays_own_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "launcher" / "aws.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    assert any("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"])


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_rayjob_runs_gmpq_run_on_a_gpu_worker_group_with_shared_storage_and_mlflow_from_env():
    job = yaml.safe_load((ROOT / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("gmpq run --config ")
    assert "--address auto" in spec["entrypoint"] and "$" + "{MLFLOW_TRACKING_URI" in spec["entrypoint"]
    assert "--storage /mnt/gmpq/" in spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    workers = cluster["workerGroupSpecs"]
    assert any(_containers(w["template"])[0]["resources"]["limits"].get("nvidia.com/gpu") for w in workers)
    for group in [cluster["headGroupSpec"], *workers]:
        c = _containers(group["template"])[0]
        assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in c["env"])
        assert any(m["mountPath"] == "/mnt/gmpq" for m in c["volumeMounts"])
        claims = [v for v in group["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims and claims[0]["persistentVolumeClaim"]["claimName"] == "gmpq-shared"


def test_raycluster_bundle_has_rwx_pvc_sweep_config_and_gpu_workers():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "kuberay" / "raycluster.yaml").read_text())}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    sweep = yaml.safe_load(docs["ConfigMap"]["data"]["sweep.yaml"])
    assert sweep["preset"] == "resnet18_imagenet" and sweep["storage_path"].startswith("/mnt/gmpq/")
    rc = docs["RayCluster"]["spec"]
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = rc["workerGroupSpecs"][0]
    assert _containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    mlflow = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "kuberay" / "mlflow.yaml").read_text())}
    assert mlflow["Deployment"]["spec"]["replicas"] == 1 and mlflow["ConfigMap"]["data"]["tracking_uri"].startswith("http")


def test_readme_cost_table_matches_the_formula():
    base = dict(n_trials=48, search_epochs=25, proxy_sizes=(10_000, 25_000, 50_000), check_train=50_000,
                check_test=10_000, teacher_epochs=30, fp_epochs=30, target_train=1_281_167, top_k=4,
                finetune_epochs=100, r_fp=13_114, r_qat=13_114 / 2)
    readme = (ROOT / "README.md").read_text()
    row = re.search(r"\| \*\*total\*\* \| \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", readme)
    assert row, "README cost table lost its total row"
    for r_search, shown in zip((887, 1_885, 3_473), row.groups()):
        est = estimate_gpu_hours(CostInputs(**base, r_search=r_search))
        assert round(est.total, 1) == pytest.approx(float(shown)), (r_search, est)
    eager = estimate_gpu_hours(CostInputs(**base, r_search=887))
    # hand check of one search: 25 epochs * 28,333 images / 887 img/s = 798.6 s = 0.222 h
    assert eager.per_search == pytest.approx(25 * 85_000 / 3 / 887 / 3600) and round(eager.per_search, 3) == 0.222
    assert f"{eager.searches:.1f}" in readme and f"{eager.finetune:.1f}" in readme
