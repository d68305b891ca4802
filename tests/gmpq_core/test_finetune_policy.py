"""A fine-tune checkpoint of another bit policy is refused in one wording (``gmpq_core.finetune_policy``): the core's
``check_resume_state`` names the layers with other bits and those only one policy quantizes, as gmpq finetune does."""
from __future__ import annotations

import pytest

from gmpq_core.errors import CheckpointError
from gmpq_core.finetune import check_resume_state
from gmpq_core.finetune_policy import policy_difference, policy_layers, recorded_policy_source
from gmpq_core.policy import BitPolicy, QuantSpec


def _policy(**bits: tuple[int, int]) -> BitPolicy:
    return BitPolicy(layers={name: QuantSpec(w_bits=w, a_bits=a) for name, (w, a) in bits.items()})


OLD = {"a": [4, 4], "b": [4, 4], "c": [4, 4], "d": [4, 4], "x": [8, 8]}
NOW = _policy(a=(2, 4), b=(4, 2), c=(3, 3), d=(4, 4), y=(4, 4))


def test_the_difference_names_two_layers_counts_the_rest_and_the_layers_in_one_policy_only():
    assert policy_layers(NOW) == {"a": [2, 4], "b": [4, 2], "c": [3, 3], "d": [4, 4], "y": [4, 4]}
    assert policy_difference(OLD, policy_layers(NOW)) == (
        "3 layer(s) have other bits (a: W4A4 there, W2A4 now; b: W4A4 there, W4A2 now; 1 more); "
        "2 layer(s) are in only one of them (e.g. x)")
    assert policy_difference({"x": [8, 8]}, {"y": [4, 4]}) == "2 layer(s) are in only one of them (e.g. x)"
    assert recorded_policy_source({"policy_source": "p.json"}) == "p.json"
    assert recorded_policy_source({"policy_source": ""}) is None and recorded_policy_source({}) is None


def test_the_cores_refusal_of_another_policys_checkpoint_says_how_they_differ_in_the_same_words(tmp_path):
    ckpt = {"epoch": 1, "model": {}, "optimizer": {}, "scheduler": {}, "history": [], "policy_layers": OLD,
            "policy_source": "/p/policy.json"}
    with pytest.raises(CheckpointError) as e:
        check_resume_state(tmp_path / "last.pt", ckpt, policy=NOW)
    assert str(e.value) == (
        f"Checkpoint '{tmp_path / 'last.pt'}' belongs to a different bit policy (/p/policy.json) than this run's: "
        f"{policy_difference(OLD, policy_layers(NOW))}; use the policy it was written with, another checkpoint "
        "folder, or delete this one to start afresh.")
    check_resume_state(tmp_path / "last.pt", {**ckpt, "policy_layers": policy_layers(NOW)}, policy=NOW)  # same: on
