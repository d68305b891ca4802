"""Experiments built on gmpq_core and the orchestrator: the generalization study (does a GMPQ policy searched on a
small proxy transfer to the target, as Wang et al., ICCV 2021, claim?)."""
