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


def _kinds(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((ROOT / "kuberay" / name).read_text())}


def test_raycluster_bundle_has_rwx_pvc_sweep_config_and_gpu_workers():
    shared = _kinds("shared.yaml")
    assert shared["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    sweep = yaml.safe_load(shared["ConfigMap"]["data"]["sweep.yaml"])
    assert sweep["preset"] == "resnet18_imagenet" and sweep["storage_path"].startswith("/mnt/gmpq/")
    docs = _kinds("raycluster.yaml")
    rc = docs["RayCluster"]["spec"]
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = rc["workerGroupSpecs"][0]
    assert _containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    mlflow = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "kuberay" / "mlflow.yaml").read_text())}
    assert mlflow["Deployment"]["spec"]["replicas"] == 1 and mlflow["ConfigMap"]["data"]["tracking_uri"].startswith("http")


def _refs(node, kind: str) -> set[str]:
    """Names of the PVCs (kind "pvc") or ConfigMaps (kind "configmap") a manifest's pods use."""
    found: set[str] = set()
    if isinstance(node, dict):
        if kind == "pvc" and "persistentVolumeClaim" in node:
            found.add(node["persistentVolumeClaim"]["claimName"])
        if kind == "configmap":
            for key in ("configMap", "configMapKeyRef"):
                if isinstance(node.get(key), dict):
                    found.add(node[key]["name"])
        for value in node.values():
            found |= _refs(value, kind)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value, kind)
    return found


def test_each_kuberay_workload_needs_only_shared_and_mlflow_yaml():
    """rayjob.yaml is not an add-on to raycluster.yaml: both (and mlflow.yaml) use only what shared.yaml
    and mlflow.yaml define, which the README applies before either."""
    defined = {"pvc": set(), "configmap": set()}
    for name in ("shared.yaml", "mlflow.yaml"):
        for doc in yaml.safe_load_all((ROOT / "kuberay" / name).read_text()):
            if doc["kind"] == "PersistentVolumeClaim":
                defined["pvc"].add(doc["metadata"]["name"])
            if doc["kind"] == "ConfigMap":
                defined["configmap"].add(doc["metadata"]["name"])
    for name in ("mlflow.yaml", "raycluster.yaml", "rayjob.yaml"):
        docs = list(yaml.safe_load_all((ROOT / "kuberay" / name).read_text()))
        assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}, name
        for kind in ("pvc", "configmap"):
            assert _refs(docs, kind) <= defined[kind], (name, kind, _refs(docs, kind) - defined[kind])
    assert "gmpq-shared" in _refs(list(yaml.safe_load_all((ROOT / "kuberay" / "rayjob.yaml").read_text())), "pvc")
    # the README applies shared.yaml, then mlflow.yaml, before any workload; rayjob.yaml is not an "or" line
    applied = re.findall(r"kubectl apply -f cluster/kuberay/(\w+\.yaml)(.*)", (ROOT / "README.md").read_text())
    order = [name for name, _ in applied]
    assert order[:2] == ["shared.yaml", "mlflow.yaml"] and {"raycluster.yaml", "rayjob.yaml"} <= set(order[2:])
    assert not any("or:" in comment for _, comment in applied)


def test_aws_launcher_copies_the_sweep_config_its_run_command_reads():
    """The README's `gmpq run --config PATH` on the head names a file that aws.yaml's file_mounts put there,
    and that file is a sweep config with the KubeRay ConfigMap's content."""
    from orchestrator.sweep_config import load_sweep_config

    repo = ROOT.parent
    cfg = yaml.safe_load((ROOT / "launcher" / "aws.yaml").read_text())
    readme = (ROOT / "README.md").read_text()
    config_path = re.search(r"ray exec cluster/launcher/aws\.yaml 'gmpq run --config (\S+)", readme).group(1)
    assert f"gmpq run --config {config_path} " in (ROOT / "launcher" / "aws.yaml").read_text()
    local = None
    for remote, source in cfg["file_mounts"].items():
        if config_path.startswith(remote.rstrip("/") + "/"):
            local = repo / source / config_path[len(remote.rstrip("/")) + 1:]
    assert local is not None and local.is_file(), (config_path, cfg["file_mounts"])
    sweep = load_sweep_config(local)
    assert sweep.n_trials == 48 and str(sweep.out_dir).startswith("/mnt/gmpq/")
    configmap = _kinds("shared.yaml")["ConfigMap"]["data"]["sweep.yaml"]
    assert yaml.safe_load(local.read_text()) == yaml.safe_load(configmap)


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
