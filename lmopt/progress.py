"""Progress display: a tqdm bar on a terminal, one line per stage on stderr otherwise (log files)."""
from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def stage(iterable: Iterable | None = None, *, desc: str, unit: str, enabled: bool = True,
          total: int | None = None) -> tqdm:
    """A tqdm over `iterable` (or a bar of `total` steps) that draws only when stderr is a terminal;
    when it is not, the stage is announced with one line instead of thousands of bar refreshes."""
    on_terminal = enabled and sys.stderr.isatty()
    if enabled and not on_terminal:
        count = total if total is not None else len(iterable)  # type: ignore[arg-type]
        print(f"lmopt: {desc} ({count} {unit})", file=sys.stderr, flush=True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not on_terminal, leave=False)
