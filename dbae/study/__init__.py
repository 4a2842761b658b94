"""A small, reproducible check of the DBAE paper's claims against DiffAE and PDAE
(``benchmarks/paper_claims.py``, results in ``docs/results.md``).

- :mod:`.config`: :class:`StudyConfig`, the one training budget and what is measured;
- :mod:`.train`: trains DBAE, DBAE-d, DiffAE and PDAE with that budget, as ``dbae train`` does;
- :mod:`.measure`: reconstruction (tractable and inverted x_T), probe, TAD / ATTRS, latency;
- :mod:`.report`: the claims' verdicts, table, JSON, Markdown and plots;
- :mod:`.run`: all of it end to end.
"""

from __future__ import annotations

from .config import LABELS, METHODS, StudyConfig, smoke_config
from .report import claims, format_claims, format_table, write_outputs
from .run import Study, run_study

__all__ = ["LABELS", "METHODS", "Study", "StudyConfig", "claims", "format_claims", "format_table", "run_study",
           "smoke_config", "write_outputs"]
