"""One policy's Ray Train job: shards and the job's checks (the stage itself: test_final_stage.py,
test_final_stage_ray.py)."""
from __future__ import annotations

import pytest
import torch

from gmpq_core.errors import ConfigError
from orchestrator.train_stage import FinalJob, shard_indices


def test_shards_are_disjoint_equal_and_deterministic():
    shards = [shard_indices(103, r, 4, seed=7) for r in range(4)]
    assert all(len(s) == 25 for s in shards)
    allidx = torch.cat(shards)
    assert len(set(allidx.tolist())) == 100 and int(allidx.max()) < 103
    assert torch.equal(shard_indices(103, 2, 4, seed=7), shards[2])
    assert not torch.equal(shard_indices(103, 2, 4, seed=8), shards[2])
    with pytest.raises(ConfigError, match="use fewer workers"):
        shard_indices(1, 0, 2, seed=0)


def test_final_job_validates_like_the_core_config():
    with pytest.raises(ConfigError, match="lr"):
        FinalJob(trial_id="t", policy_json="{}", fp_checkpoint="x", dataset="mnist5k", lr=-1.0)
    with pytest.raises(ConfigError, match="train_size=0"):
        FinalJob(trial_id="t", policy_json="{}", fp_checkpoint="x", dataset="mnist5k", train_size=0)
    with pytest.raises(ConfigError, match="finetune precision must be one of auto, fp32, bf16.*'half'"):
        FinalJob(trial_id="t", policy_json="{}", fp_checkpoint="x", dataset="mnist5k", precision="half")
