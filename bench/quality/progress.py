"""Names and progress lines shared by the experiment's stages (run.py) and its report (report.py)."""

from __future__ import annotations

import sys
import time


def wkey(w: float) -> str:
    """A weight or temperature as it appears in method names: 1.0 -> '1', 0.5 -> '0.5'."""
    return f"{float(w):g}"


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
