"""Progress bars for long work: shown on a terminal (never in logs), on the main process only, once it is long."""

from __future__ import annotations

import os


def bar(total: int, desc: str, unit: str, show_from: int = 1):
    """A tqdm bar over ``total`` items, shown when stderr is a terminal, the process is rank 0 of a launcher (or none)
    and there are at least ``show_from`` items; otherwise a silent one (same methods)."""
    from tqdm.auto import tqdm

    quiet = total < show_from or int(os.environ.get("RANK", "0")) > 0
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, mininterval=1.0, leave=False,
                disable=True if quiet else None)
