"""Headless matplotlib for the PNG plots of reports and benchmarks (an optional dependency)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None where matplotlib is
    not installed (callers then write no plot and say so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
