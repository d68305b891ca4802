"""Variant names of ``bench_search_step.py``: ``impl[:conv][+suffix...]`` parsed (its docstring says what each
suffix does)."""
from __future__ import annotations

from dataclasses import dataclass

ALL_VARIANTS = ("reference", "fused", "compiled", "triton")  # also accepted: "fused:conv", suffixes below
SUFFIXES = ("graph", "bnteacher", "keep", "recompute", "tstream", "tsplit", "tcompile", "tunfold", "tfreeze",
            "tweights")


@dataclass(frozen=True)
class Variant:
    """A variant name parsed: ``impl[:conv][+graph][+bnteacher][+keep|+recompute][+tstream]`` (module docstring);
    ``keep`` None is the default rule (``gmpq_core.fused.keeps_operands``)."""
    impl: str
    conv_node: bool | None
    graph: bool
    bn_teacher: bool
    keep: bool | None
    teacher_stream: bool = False
    teacher_pass: frozenset[str] = frozenset()      # of "tsplit", "tcompile", "tunfold", "tfreeze"

    @property
    def cuda_only(self) -> bool:
        """Triton kernels, CUDA graphs, a CUDA stream: on a CPU the step would run other code under this name."""
        return self.impl == "triton" or self.graph or self.teacher_stream

    @classmethod
    def parse(cls, name: str) -> "Variant":
        head, *suffixes = name.split("+")
        impl, _, node = head.partition(":")
        bad = [x for x in suffixes if x not in SUFFIXES] + ([node] if node not in ("", "conv") else [])
        if impl not in ALL_VARIANTS or bad:
            raise ValueError(f"variant {name!r}: give impl[:conv][+suffix...] with impl one of {ALL_VARIANTS} and "
                             f"suffixes from {SUFFIXES} (got {bad or impl!r})")
        if {"keep", "recompute"} <= set(suffixes):
            raise ValueError(f"variant {name!r}: +keep and +recompute exclude each other (keep the operands for the "
                             "backward pass, or recompute them); give one of them, or neither for the default rule")
        keep = True if "keep" in suffixes else False if "recompute" in suffixes else None
        return cls(impl, True if node == "conv" else None, "graph" in suffixes, "bnteacher" in suffixes, keep,
                   "tstream" in suffixes, frozenset(suffixes) & {"tsplit", "tcompile", "tunfold", "tfreeze"})
