"""What one ``gmpq sync-mlflow`` did (``orchestrator.sync.sync_mlflow``'s report; ``gmpq sync-mlflow`` prints it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SyncReport"]


@dataclass(frozen=True)
class SyncReport:
    """What one sync did. ``duplicates``: trial ids with more than one child run in the store (should be 0).
    ``nothing_to_sync``: the folder holds no results yet (no run was looked up or created; ``parent_run_id`` None)."""
    sweep_dir: Path
    tracking_uri: str
    experiment_name: str
    parent_run_id: str | None
    parent_created: bool
    trials: int
    runs_created: int
    runs_updated: int
    runs_unchanged: int
    tables_logged: tuple[str, ...]
    duplicates: int
    nothing_to_sync: bool = False
    runs_tagged: int = 0
    finetune_series_logged: int = 0                       # fine-tune runs given epochs from their checkpoints
    finetunes_without_history: tuple[str, ...] = ()       # trial ids whose runs keep the final row only
    checkpoint_storage: str = ""                          # where their Ray Train checkpoints were looked for
    finetune_runs_recreated: int = 0                      # fine-tune runs made again for rows the store lost
    parent_restored: bool = False                         # the parent run was in the deleted stage: restored
    runs_restored: int = 0                                # runs under it deleted with it, restored too
    runs_restored_unsorted: bool = False                  # the store did not say which were: every deleted one
    removed_parent_run_id: str | None = None              # the parent run mlflow gc removed (a new one was made)
    runs_reattached: int = 0                              # runs moved from that one under the new parent
    finetune_runs_completed: int = 0                      # fine-tune runs a stopped final stage left unfinished
    kept_runs_made: int = 0                               # runs made for fine-tunes kept aside (models/kept/)
    kept_runs_tagged: int = 0                             # runs given (kept) or relieved of (restored) gmpq.kept

    @property
    def changed(self) -> bool:
        return bool(self.parent_created or self.runs_created or self.runs_updated or self.tables_logged
                    or self.runs_tagged or self.finetune_series_logged or self.finetune_runs_recreated
                    or self.finetune_runs_completed or self.parent_restored or self.runs_reattached
                    or self.kept_runs_made or self.kept_runs_tagged)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "sweep_dir": str(self.sweep_dir),
                "tables_logged": list(self.tables_logged), "changed": self.changed,
                "finetunes_without_history": list(self.finetunes_without_history)}
