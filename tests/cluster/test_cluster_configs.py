"""The shipped cluster configs parse and say what the README promises; the README's cost table is
recomputed from cluster.cost (so the two cannot drift apart)."""
from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
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
    words = _entrypoint_words(spec["entrypoint"])
    assert words[:4] == ["exec", "gmpq", "run", "--config"]
    assert "--address auto" in " ".join(words) and "$" + "{MLFLOW_TRACKING_URI" in spec["entrypoint"]
    assert "--storage /mnt/gmpq/" in " ".join(words) and spec["shutdownAfterJobFinishes"] is True
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


def _entrypoint_words(entrypoint: str) -> list[str]:
    """The words of the driver script of rayjob.yaml's `sh -c '<script>'` entrypoint."""
    outer = shlex.split(entrypoint)
    assert outer[:2] == ["sh", "-c"] and len(outer) == 3, outer
    return shlex.split(outer[2])


def _stub(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)
    (folder / name).chmod(0o755)


def test_rayjob_entrypoint_reads_the_mlflow_uri_on_the_head_not_in_the_submitter(tmp_path):
    """KubeRay's K8sJobMode submitter (a pod of its own, without the head's env) runs
    `/bin/bash -ce -- "... ray job submit --address http://<head-svc>:8265 ... -- ENTRYPOINT ; ..."`
    (ray-operator/controllers/ray/common/job.go, BuildJobSubmitCommand); Ray's own `ray job submit` joins the
    words it gets into the job's entrypoint, which the job supervisor on the head runs with shell=True and the
    head's env. Replayed here with Ray's real `submit` command (only its HTTP client faked): the submitter
    must not need $MLFLOW_TRACKING_URI, and the head must pass its value to gmpq, or fail naming it."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash (the submitter's shell)")
    spec = yaml.safe_load((ROOT / "kuberay" / "rayjob.yaml").read_text())["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and "submitterPodTemplate" not in spec   # KubeRay's default pod
    submitter_bin, head_bin = tmp_path / "submitter", tmp_path / "head"
    submitter_bin.mkdir()
    head_bin.mkdir()
    recorded = tmp_path / "entrypoint.txt"
    _stub(submitter_bin, "ray", f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
if args[:2] == ["job", "status"]:
    sys.exit(1)                       # not submitted yet
if args[:2] == ["job", "logs"]:
    sys.exit(0)
assert args[:2] == ["job", "submit"], args
from ray.dashboard.modules.job import cli

class Client:
    def submit_job(self, **kw):
        open({str(recorded)!r}, "w").write(kw["entrypoint"])
        return kw.get("submission_id") or "job"

    def get_version(self):
        return "1"

cli._get_sdk_client = lambda *a, **k: Client()
cli.submit.main(args[2:], prog_name="ray job submit", standalone_mode=False)
""")
    addr, sid = "http://gmpq-resnet18-head-svc:8265", "gmpq-resnet18-x"
    script = (f"if ! ray job status --address {addr} {sid} >/dev/null 2>&1 ; then ray job submit --address {addr} "
              f"--no-wait --submission-id {sid} -- {spec['entrypoint'].strip()} ; fi ; "
              f"ray job logs --address {addr} --follow {sid}")
    submitter_env = {"PATH": f"{submitter_bin}:/usr/bin:/bin", "HOME": str(tmp_path)}   # no MLFLOW_TRACKING_URI
    sub = subprocess.run(["bash", "-ce", "--", script], env=submitter_env, capture_output=True, text=True,
                         timeout=120)
    assert sub.returncode == 0 and recorded.is_file(), sub.stderr[-3000:]
    entrypoint = recorded.read_text()

    args_file = tmp_path / "gmpq_args"
    _stub(head_bin, "gmpq", f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {args_file}\n")
    uri = _kinds("mlflow.yaml")["ConfigMap"]["data"]["tracking_uri"]
    head_env = {"PATH": f"{head_bin}:/usr/bin:/bin", "MLFLOW_TRACKING_URI": uri}
    ran = subprocess.run(entrypoint, shell=True, env=head_env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    got = args_file.read_text().splitlines()
    assert got[:3] == ["run", "--config", "/etc/gmpq/sweep.yaml"]
    assert got[got.index("--tracking-uri") + 1] == uri and got[got.index("--address") + 1] == "auto"
    for unset in ({}, {"MLFLOW_TRACKING_URI": ""}):
        args_file.unlink(missing_ok=True)
        ran = subprocess.run(entrypoint, shell=True, env={"PATH": head_env["PATH"], **unset}, capture_output=True,
                             text=True, timeout=60)
        assert ran.returncode != 0 and "MLFLOW_TRACKING_URI" in ran.stderr and "gmpq-mlflow" in ran.stderr
        assert not args_file.exists()


def test_rayjob_head_dashboard_listens_where_the_submitter_pod_reaches_it():
    """In K8sJobMode the submitter pod and the operator use the Jobs API at http://<head-svc>:8265."""
    spec = yaml.safe_load((ROOT / "kuberay" / "rayjob.yaml").read_text())["spec"]
    params = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert params.get("dashboard-host", "0.0.0.0") == "0.0.0.0"     # absent: KubeRay's default, 0.0.0.0


def _kinds(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((ROOT / "kuberay" / name).read_text())}


def _named(name: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all((ROOT / "kuberay" / name).read_text())
            if d["kind"] == kind}


def test_raycluster_bundle_has_rwx_pvc_sweep_config_and_gpu_workers():
    shared = _kinds("shared.yaml")
    assert _named("shared.yaml", "PersistentVolumeClaim")["gmpq-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]
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


def _docs_and_configs() -> dict[str, str]:
    files = [ROOT / "README.md", *sorted((ROOT / "kuberay").glob("*.yaml")),
             *sorted((ROOT / "launcher").rglob("*.yaml"))]
    return {str(f.relative_to(ROOT.parent)): f.read_text() for f in files}


def test_paths_sizes_and_out_dirs_named_in_the_cluster_docs_agree():
    """Every cluster/... file the docs and comments name exists; every `--out` and every
    `resources {cpu: C, gpu: G}` they state is the shared sweep config's."""
    sweep = yaml.safe_load((ROOT / "launcher" / "configs" / "sweep.yaml").read_text())
    stated_resources = f"{{cpu: {sweep['resources']['cpu']}, gpu: {sweep['resources']['gpu']}}}"
    outs, sizes = [], []
    for name, text in _docs_and_configs().items():
        for path in re.findall(r"\bcluster/[\w/.-]+\.(?:yaml|py|md)\b", text):
            assert (ROOT.parent / path).is_file(), (name, path)
        outs += [(name, o) for o in re.findall(r"--out (/mnt/\S+)", text)]
        sizes += [(name, r) for r in re.findall(r"resources (\{cpu: [\d.]+, gpu: [\d.]+\})", text)]
    assert outs and all(o == sweep["out_dir"] for _, o in outs), outs
    assert sizes and all(r == stated_resources for _, r in sizes), sizes
    assert "cluster/launcher/configs/sweep.yaml" in (ROOT / "kuberay" / "shared.yaml").read_text()


def test_aws_docs_copy_a_changed_config_with_rsync_up_not_ray_up():
    """`ray up` again reruns head_start_ray_commands (`ray stop` first: it ends a running sweep)."""
    cfg = yaml.safe_load((ROOT / "launcher" / "aws.yaml").read_text())
    remote = next(r for r, local in cfg["file_mounts"].items() if local == "cluster/launcher/configs")
    rsync = f"ray rsync-up cluster/launcher/aws.yaml cluster/launcher/configs/ {remote}/"
    assert cfg["head_start_ray_commands"][0] == "ray stop"
    for rel in ("README.md", "launcher/aws.yaml", "launcher/configs/sweep.yaml"):
        text = (ROOT / rel).read_text()
        assert rsync in text and "ray stop" in text, rel
        assert not re.search(r"`?ray up[^\n]*`? again to (copy|resync)|again on each later `ray up`", text), rel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_aws_mlflow_setup_command_tolerates_only_a_server_already_answering(tmp_path):
    """`ray up` reruns head_setup_commands when a file changed; `gmpq mlflow-server --detach` exits 2 while its
    server runs. The setup command must skip the start when the server answers, and start it (failures
    included) otherwise. Replayed with the port swapped for a free one and a stub gmpq."""
    cfg = yaml.safe_load((ROOT / "launcher" / "aws.yaml").read_text())
    [command] = [c for c in cfg["head_setup_commands"] if "gmpq mlflow-server" in c]
    assert command.count("5000") >= 2 and "|| true" not in command
    port = _free_port()
    command = command.replace("5000", str(port))
    calls = tmp_path / "gmpq_calls"
    _stub(tmp_path, "gmpq", f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 2\n")
    env = {"PATH": f"{tmp_path}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}

    # nothing answers: gmpq is run, and its failure fails the command (so `ray up`)
    ran = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2 and calls.read_text().split() == ["mlflow-server", "--port", str(port), "--dir",
                                                                "/mnt/gmpq/mlflow", "--detach"], ran.stderr
    calls.unlink()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:    # a server already answers: nothing is started, the command succeeds
        ran = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert ran.returncode == 0 and not calls.exists(), ran.stderr


def test_mlflow_sqlite_store_is_off_nfs_on_kuberay_and_the_aws_exception_is_explained():
    """SQLite's locking is unreliable on NFS. KubeRay: the server's --dir is on a ReadWriteOnce PVC of its own,
    not the RWX share. AWS keeps it on EFS (runs outlive `ray down`), documented as a single-writer exception."""
    deployment = _kinds("mlflow.yaml")["Deployment"]["spec"]["template"]["spec"]
    command = deployment["containers"][0]["command"]
    store = command[command.index("--dir") + 1]
    [mount] = [m for m in deployment["containers"][0]["volumeMounts"] if store.startswith(m["mountPath"])]
    [volume] = [v for v in deployment["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = _named("shared.yaml", "PersistentVolumeClaim")[claim]
    assert claim != "gmpq-shared" and pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert deployment["securityContext"]["fsGroup"] == 100
    assert _kinds("mlflow.yaml")["Deployment"]["spec"]["replicas"] == 1
    aws = (ROOT / "launcher" / "aws.yaml").read_text()
    assert "--dir /mnt/gmpq/mlflow" in aws and "only writer" in aws
    readme = (ROOT / "README.md").read_text()
    assert "SQLite on NFS is fragile" in readme and "only" in readme and "gmpq-mlflow-store" in readme
