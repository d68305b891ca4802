"""bench_search_step.py's variant names and a tiny end-to-end run of its CPU variants and suffixes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_search_step  # noqa: E402
from bench_search_step import Variant  # noqa: E402


def test_variant_names_parse_and_a_bad_one_names_the_grammar():
    assert Variant.parse("triton+graph+keep") == Variant("triton", None, True, False, True)
    assert Variant.parse("fused:conv+bnteacher") == Variant("fused", True, False, True, None)
    assert Variant.parse("triton+graph+recompute") == Variant("triton", None, True, False, False)
    for bad in ("fused+grpah", "fussed", "fused:node"):
        with pytest.raises(ValueError, match="impl\\[:conv\\]"):
            Variant.parse(bad)
    with pytest.raises(ValueError, match="\\+keep and \\+recompute exclude each other"):
        Variant.parse("fused+keep+recompute")
    assert bench_search_step.main(["--variants", "fused+fast", "--no-memory"]) == 2


def test_the_folded_and_the_batchnorm_teacher_and_kept_operands_run_side_by_side(tmp_path):
    out = tmp_path / "rows.json"
    variants = "fused,fused+bnteacher,fused:conv+keep"
    assert bench_search_step.main(["--models", "resnet20:8:1", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                                   "--threads", "1", "--variants", variants, "--no-memory", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == variants.split(",") and all(r["ratio"] > 0 for r in rows)


def test_each_variant_gets_the_teacher_and_keep_setting_its_name_asks_for():
    import torch

    from gmpq_core.supernet import mixed_layers

    b = bench_search_step.build_bench("resnet20", 8, 1, 4, "cpu", ["fused", "fused+bnteacher", "fused:conv+keep",
                                                                     "fused+recompute"],
                                      channels_last=False)

    def n_bn(m):
        return sum(isinstance(q, torch.nn.BatchNorm2d) for q in m.modules())
    assert n_bn(b.teacher_of("fused")) == 0 and n_bn(b.teacher_of("fused+bnteacher")) == 21
    keeps = {v: {m.keep_operands for m in mixed_layers(net).values()} for v, (net, _) in b.supernets.items()}
    assert keeps == {"fused": {None}, "fused+bnteacher": {None}, "fused:conv+keep": {True}, "fused+recompute": {False}}
