"""Experiments built on gmpq_core and the orchestrator (the generalization study, METHOD.md 7)."""
