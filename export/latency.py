"""End-to-end latency of the runners: encode, decode at K steps, edit (encode + shift + decode).

Each measurement synchronises the device before and after every call and reads the host
clock around it, so a time is what a caller waits for, host work included. Warm-up calls
(graph capture, autotuning, lazy initialisation) are not timed. Reported: median, p95 and
mean over ``runs`` calls, and images per second at the median.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dbae.plotting import pyplot

from .runner import DecodeSetting, Runner

Tensor = torch.Tensor

#: a runner for a decode setting (runners fix their decode length when made)
RunnerFactory = Callable[[DecodeSetting], Runner]


@dataclass(frozen=True)
class LatencyRow:
    runner: str
    op: str  # encode | decode | edit
    batch: int
    steps: int | None  # decode steps (None for encode)
    nfe: int | None
    median_ms: float
    p95_ms: float
    mean_ms: float
    runs: int

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.median_ms * 1e-3)


def time_calls(fn: Callable[[], object], sync: Callable[[], None], *, warmup: int, runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` synchronised calls of fn, after ``warmup`` untimed ones."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _row(runner: str, op: str, batch: int, setting: DecodeSetting | None, times: list[float]) -> LatencyRow:
    return LatencyRow(
        runner=runner, op=op, batch=batch, steps=setting.steps if setting else None,
        nfe=setting.nfe if setting else None, median_ms=statistics.median(times),
        p95_ms=percentile(times, 95), mean_ms=statistics.fmean(times), runs=len(times),
    )  # fmt: skip


def bench_latency(
    factories: dict[str, RunnerFactory],
    *,
    steps: Sequence[int],
    batches: Sequence[int],
    sampler: str = "euler",
    warmup: int = 3,
    runs: int = 20,
    seed: int = 0,
    report: Callable[[LatencyRow], None] | None = None,
) -> list[LatencyRow]:
    """Rows for every runner, batch size and decode length: encode once per batch, then decode
    and edit per K. Inputs are seeded random images in [-1, 1] and a random unit direction."""
    rows: list[LatencyRow] = []

    def add(row: LatencyRow) -> None:
        rows.append(row)
        if report is not None:
            report(row)

    for name, make in factories.items():
        for i, k in enumerate(steps):
            setting = DecodeSetting(k, sampler)
            runner = make(setting)
            sync = runner.synchronize
            for batch in batches:
                g = torch.Generator().manual_seed(seed + batch)
                images = (torch.rand((batch, *runner.image_shape), generator=g) * 2 - 1).to(runner.device)
                direction = torch.randn(runner.z_dim, generator=g)
                direction = (direction / direction.norm()).to(runner.device)
                z = runner.encode(images)
                if i == 0:  # encode does not depend on K
                    add(_row(name, "encode", batch, None, time_calls(lambda: runner.encode(images), sync,
                                                                       warmup=warmup, runs=runs)))
                add(_row(name, "decode", batch, setting, time_calls(lambda: runner.decode(z), sync,
                                                                      warmup=warmup, runs=runs)))
                add(_row(name, "edit", batch, setting, time_calls(lambda: runner.edit(images, direction, 2.0), sync,
                                                                    warmup=warmup, runs=runs)))
            runner = None  # release its graphs or sessions before the next K
    return rows


# ----- output -----
HEADER = f"{'runner':18} {'op':7} {'batch':>5} {'K':>3} {'NFE':>4} {'median ms':>10} {'p95 ms':>9} {'img/s':>9}"


def format_row(r: LatencyRow) -> str:
    k = "-" if r.steps is None else str(r.steps)
    nfe = "-" if r.nfe is None else str(r.nfe)
    return (
        f"{r.runner:18} {r.op:7} {r.batch:5d} {k:>3} {nfe:>4} {r.median_ms:10.3f} {r.p95_ms:9.3f} "
        f"{r.images_per_s:9.1f}"
    )


def format_table(rows: Sequence[LatencyRow]) -> str:
    return "\n".join([HEADER, *map(format_row, rows)])


def speedups(rows: Sequence[LatencyRow], baseline: str = "eager") -> list[dict]:
    """Median-latency ratio baseline / runner for every row that has a baseline row."""
    base = {(r.op, r.batch, r.steps): r.median_ms for r in rows if r.runner == baseline}
    out = []
    for r in rows:
        ref = base.get((r.op, r.batch, r.steps))
        if r.runner != baseline and ref is not None:
            out.append({"runner": r.runner, "op": r.op, "batch": r.batch, "steps": r.steps,
                        "speedup": ref / r.median_ms})  # fmt: skip
    return out


def write_json(rows: Sequence[LatencyRow], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "rows": [asdict(r) | {"images_per_s": r.images_per_s} for r in rows],
        "speedup_vs_eager": speedups(rows),
    }
    path.write_text(json.dumps(data, indent=2))


def plot(rows: Sequence[LatencyRow], path: Path, title: str = "") -> bool:
    """Median latency (p95 as the whisker) per operation, one bar per runner, one panel per
    batch size, log scale. False (and nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    batches = sorted({r.batch for r in rows})
    runners = list(dict.fromkeys(r.runner for r in rows))
    ops = list(dict.fromkeys((r.op, r.steps) for r in rows))
    labels = [op if k is None else f"{op} K={k}" for op, k in ops]
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(6.0, 0.9 * len(ops) * len(runners) ** 0.5 + 2), 3.2 * len(batches)),
                             squeeze=False)  # fmt: skip
    width = 0.8 / max(1, len(runners))
    for ax, batch in zip(axes[:, 0], batches):
        for j, name in enumerate(runners):
            by_op = {(r.op, r.steps): r for r in rows if r.runner == name and r.batch == batch}
            xs, med, err = [], [], []
            for i, key in enumerate(ops):
                if key in by_op:
                    xs.append(i + (j - (len(runners) - 1) / 2) * width)
                    med.append(by_op[key].median_ms)
                    err.append(by_op[key].p95_ms - by_op[key].median_ms)
            ax.bar(xs, med, width, yerr=[[0] * len(err), err], capsize=2, label=name)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, p95)")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.set_xticks(range(len(ops)), labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
