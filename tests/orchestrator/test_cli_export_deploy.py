"""Shipping the final models (walkthrough): ``gmpq export`` says how to run what it wrote, and the way it says runs
with torch and the gmpq_core folder alone; the models folder itself is a folder of models; a sweep not fine-tuned
yet names the command that makes its models; a damaged model file is refused before any row."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from final_model_files import sweep_with_models

import gmpq_core
from gmpq_core.export import load_quantized_model
from orchestrator.cli import main

BLOCKED = ("orchestrator", "ray", "optuna", "mlflow", "pyarrow", "pandas", "torchvision", "yaml", "tqdm",
           "matplotlib", "sklearn", "mlxtend", "numpy")
ONLY_TORCH = f"""
import sys
class Block:                        # gmpq's other dependencies are not there (nor the gmpq install itself)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError("not installed here: " + name)
sys.meta_path.insert(0, Block())
import torch
images = torch.load(sys.argv[1])
"""


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_export_says_how_to_run_the_file_and_that_runs_with_only_torch_and_gmpq_core(tmp_path, capsys):
    sweep = sweep_with_models(tmp_path / "sweep", n=1)
    assert main(["export", str(sweep)]) == 0
    out = capsys.readouterr().out
    note = out[out.index("Run it in Python"):].splitlines()
    assert "torch and this project's gmpq_core folder on the path (no gmpq install" in note[0]
    code = [line.strip() for line in note[1:] if line.startswith("  ")]
    assert code[1] == f"q = load_quantized_model({str(sweep / 'models' / 't0.int.pt')!r})"
    shipped = tmp_path / "shipped"                            # what a user copies to the machine that runs it
    shutil.copytree(Path(gmpq_core.__file__).parent, shipped / "gmpq_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    images = torch.rand(5, 1, 28, 28)
    torch.save(images, tmp_path / "images.pt")
    script = ONLY_TORCH + "\n".join(code) + "\ntorch.save(logits.detach(), sys.argv[2])\n"
    site = str(Path(torch.__file__).parent.parent)            # torch's own folder, without its .pth files (-S)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shipped), site])}
    done = subprocess.run([sys.executable, "-S", "-c", script, str(tmp_path / "images.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    q = load_quantized_model(sweep / "models" / "t0.pt")     # the float model, here with gmpq
    with torch.no_grad():
        ref = q.model(q.normalize(images))
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref, rtol=1e-4, atol=1e-4)


def test_export_and_evaluate_take_the_models_folder_itself(tmp_path, capsys):
    sweep = sweep_with_models(tmp_path / "sweep")
    assert main(["export", str(sweep / "models"), "--json"]) == 0
    assert sorted(p.name for p in (sweep / "models").glob("*.int.pt")) == ["t0.int.pt", "t1.int.pt"]
    capsys.readouterr()
    from orchestrator.commands.evaluate import model_paths
    assert [p.name for p in model_paths([str(sweep / "models")])] == ["t0.pt", "t0.int.pt", "t1.pt", "t1.int.pt"]


def test_export_of_a_sweep_not_fine_tuned_yet_names_the_command_that_makes_its_models(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep_config.yaml").write_text("name: demo\n")
    (sweep / "models").mkdir()
    assert main(["export", str(sweep)]) == 2
    assert (f"'{sweep}' is a sweep whose final stage has not written a model yet (no models/*.pt): 'gmpq finetune "
            f"--sweep {sweep}' fine-tunes its selected policies") in _err(capsys)


def test_evaluate_and_export_refuse_a_damaged_model_file_before_any_row(tmp_path, capsys):
    sweep = sweep_with_models(tmp_path / "sweep")
    path = sweep / "models" / "t1.pt"
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    middle = info.header_offset + info.compress_size // 2 + 100   # inside that tensor's bytes
    data[middle:middle + 32] = bytes(32)
    path.write_bytes(bytes(data))
    for command in ("evaluate", "export"):
        assert main([command, str(path)]) == 2
        captured = capsys.readouterr()
        err = " ".join(captured.err.split())
        assert f"Checkpoint '{path}' is corrupted: its part" in err and "Traceback" not in err
        assert captured.out == ""
    assert not list((sweep / "models").glob("*.int.pt"))


def test_evaluate_notes_a_sweep_model_file_that_holds_another_trials_model(tmp_path, capsys):
    sweep = sweep_with_models(tmp_path / "sweep")
    (sweep / "sweep_config.yaml").write_text("name: demo\n")     # (a sweep folder: the note reads no more of it)
    other = sweep / "models" / "t1.pt"
    other.write_bytes((sweep / "models" / "t0.pt").read_bytes())     # t0's model under t1's name (a copy-in)
    own = tmp_path / "deploy" / "models" / "resnet20_fmnist.pt"       # one's own folder named models/: no trial named
    own.parent.mkdir(parents=True)
    own.write_bytes(other.read_bytes())
    assert main(["evaluate", str(other), str(sweep / "models" / "t0.pt"), str(own), "--test-size", "50"]) == 0
    err = _err(capsys)
    assert (f"note: '{other}' holds the fine-tuned model of trial t0 (recorded in the file), not of trial t1 as its "
            "name says") in err
    assert err.count("note:") == 1                              # t0.pt is t0's, resnet20_fmnist.pt no trial's: none
