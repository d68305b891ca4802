"""Plain-text output shared by the commands: a value or "-", and aligned tables (no heavy imports)."""
from __future__ import annotations

import math
from typing import Any, Container, Sequence

__all__ = ["fmt", "text_table", "PROXY_NOTE"]


def fmt(v: Any, spec: str) -> str:
    """``format(v, spec)``, or "-" for a missing value (None, NaN, infinity)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]], right: Container[int] = ()) -> str:
    """An aligned table with a rule under the header; columns whose index is in ``right`` align right."""
    widths = [max([len(h)] + [len(r[c]) for r in rows]) for c, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


PROXY_NOTE = ("proxy%: a completed trial's searched policy (BatchNorm recalibrated) on held-out images of the proxy "
              "dataset; a pruned, running or stopped trial's supernet at its last search epoch.")
