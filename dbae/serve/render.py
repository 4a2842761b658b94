"""One model, its runners, and one worker thread that runs them for every connection.

Every runner call of the server goes through :class:`Renderer`: connections submit
encode or decode jobs (their own rows of images or latents) and await the result. A
dispatcher task on the event loop takes every job that is waiting when the runner comes
free and, with batching on (``max_batch`` > 1), concatenates the jobs of one kind and
decode setting into one runner call of up to ``max_batch`` rows, then hands each job its
rows. The calls run one at a time in a single worker thread, so the event loop keeps
receiving messages (and coalescing them, see :mod:`dbae.serve.session`) while the runner
works.

Runners are made by :func:`dbae.export.registry.factory`, one per decode setting (steps,
sampler), on first use, and kept.

Timing of each job (:class:`Rendered`): ``runner_ms`` the runner call it was part of
(measured in the worker thread, the copy of the result to the CPU included), ``blocked_ms``
the runner time spent on other calls while it waited, ``queue_ms`` all of its wait, and
``rows`` / ``jobs`` the size of the call.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..export.registry import factory as runner_factory
from ..export.runner import DecodeSetting, Runner
from ..model import DBAE

Tensor = torch.Tensor

ENCODE, DECODE = "encode", "decode"

#: the longest the dispatcher waits for the connections it just served to submit again, so
#: that their jobs join the next runner call (seconds; only while batching, see _dispatch)
GATHER_S = 0.002


def resolve_runner_kind(kind: str, device: torch.device, precision: str | None = None) -> str:
    """``auto``: on the CPU the ONNX Runtime step runner where onnx and onnxruntime import
    (one U-Net graph, exported once per model into the cache and driven by the sampler, so
    every steps / sampler setting is ready at once; see docs/benchmarks.md for its latency
    against eager and the unrolled onnxruntime runner), eager PyTorch where they do not or
    for a ``precision`` that ONNX Runtime cannot run (bf16); the CUDA-graph runner on a GPU.
    Any other kind is returned as it is."""
    if kind != "auto":
        return kind
    if device.type == "cuda":
        return "cuda-graph"
    if precision not in (None, "fp32", "fp16"):
        return "eager"
    return "onnxruntime-step" if _onnxruntime_imports() else "eager"


def _onnxruntime_imports() -> bool:
    try:
        for module in ("onnx", "onnxruntime"):
            importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Rendered:
    """The rows of one job and how they were made."""

    out: Tensor  # on the CPU, float32
    runner_ms: float
    queue_ms: float
    blocked_ms: float
    rows: int  # rows of the runner call
    jobs: int  # jobs of the runner call


@dataclass
class _Job:
    op: str
    setting: DecodeSetting
    x: Tensor
    future: asyncio.Future
    submitted: float  # time.perf_counter()
    busy_at_submit: float  # the renderer's cumulative busy ms at submit time


@dataclass
class RendererStats:
    calls: int = 0
    rows: int = 0
    jobs: int = 0
    busy_ms: float = 0.0
    by_op: dict = field(default_factory=lambda: {ENCODE: 0, DECODE: 0})


class Renderer:
    """Runs encode / decode jobs of all connections on runners of ``kind`` (a name of
    :data:`dbae.export.registry.KINDS`) for ``model``, batching up to ``max_batch`` rows."""

    def __init__(self, model: DBAE, kind: str, precision: str, default: DecodeSetting, *, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.kind = kind
        self.precision = precision
        self.default = default
        self.max_batch = max_batch
        self._make = runner_factory(kind, model, precision)
        self._runners: dict[DecodeSetting, Runner] = {}
        # the worker thread runs with torch's CPU thread count of now (see dbae serve --threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbae-runner",
                                            initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        self._jobs: deque[_Job] = deque()  # submitted, not yet taken by the dispatcher
        self._arrived: asyncio.Event | None = None  # set by submit
        self._task: asyncio.Task | None = None
        self._busy_done = 0.0  # ms of finished runner calls
        self._busy_since: float | None = None  # perf_counter() when the current call started
        self.stats = RendererStats()

    # ----- runners -----
    def runner(self, setting: DecodeSetting | None = None) -> Runner:
        """The runner of ``setting`` (made on first use; call from the worker thread once serving)."""
        setting = setting or self.default
        if setting not in self._runners:
            self._runners[setting] = self._make(setting)
        return self._runners[setting]

    @property
    def name(self) -> str:
        return self.runner(self.default).name

    @property
    def device(self) -> torch.device:
        return self.runner(self.default).device

    # ----- life cycle (on the serving event loop) -----
    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._dispatch(), name="dbae-renderer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    # ----- jobs -----
    def _busy_now(self) -> float:
        since = self._busy_since
        return self._busy_done + (0.0 if since is None else (time.perf_counter() - since) * 1e3)

    async def submit(self, op: str, setting: DecodeSetting, x: Tensor) -> Rendered:
        """Run ``op`` (encode: images (B, C, H, W); decode: latents (B, d)) at ``setting``."""
        if self._arrived is None:
            raise RuntimeError("the renderer is not started")
        future = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(op, setting, x, future, time.perf_counter(), self._busy_now()))
        self._arrived.set()
        return await future

    async def _dispatch(self) -> None:
        assert self._arrived is not None
        arrived, jobs, loop = self._arrived, self._jobs, asyncio.get_running_loop()
        waiting: list[_Job] = []
        returning = 0  # jobs of the last call: their connections usually submit again at once
        while True:
            # Expect the others waiting now and the connections just served. Without this
            # wait, those come back a moment after the next call started and the connections
            # take turns in two half-size batches instead of sharing one.
            expected = min(self.max_batch, len(waiting) + len(jobs) + returning)
            deadline = None
            while True:
                waiting += jobs
                jobs.clear()
                if waiting:
                    if deadline is None:
                        deadline = loop.time() + GATHER_S
                    left = deadline - loop.time()
                    if len(waiting) >= expected or left <= 0:
                        break
                arrived.clear()
                try:  # (a wake-up lost to the timeout loses nothing: the jobs are in the deque)
                    await asyncio.wait_for(arrived.wait(), left if waiting else None)
                except asyncio.TimeoutError:
                    pass
            batch, waiting = self._take_batch(waiting)
            returning = len(batch)
            if batch:
                await self._run(loop, batch)

    def _take_batch(self, waiting: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """The first live job and those of its kind that fit beside it; the rest, in order."""
        live = [j for j in waiting if not j.future.done()]  # a cancelled job's connection is gone
        if not live:
            return [], []
        first, batch, rest, rows = live[0], [live[0]], [], live[0].x.shape[0]
        for job in live[1:]:
            n = job.x.shape[0]
            if job.op == first.op and job.setting == first.setting and rows + n <= self.max_batch:
                batch.append(job)
                rows += n
            else:
                rest.append(job)
        return batch, rest

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        op, setting = batch[0].op, batch[0].setting
        x = batch[0].x if len(batch) == 1 else torch.cat([j.x for j in batch])
        started = time.perf_counter()
        busy = self._busy_now()
        self._busy_since = started
        try:
            out, runner_ms = await loop.run_in_executor(self._executor, self._call, op, setting, x)
        except Exception as exc:  # noqa: BLE001  (handed to every job of the call)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self._busy_done += (time.perf_counter() - started) * 1e3
            self._busy_since = None
        s = self.stats
        s.calls += 1
        s.rows += x.shape[0]
        s.jobs += len(batch)
        s.busy_ms += runner_ms
        s.by_op[op] += 1
        lo = 0
        for job in batch:
            n = job.x.shape[0]
            if not job.future.done():
                job.future.set_result(Rendered(
                    out[lo:lo + n], runner_ms, (started - job.submitted) * 1e3,
                    max(0.0, busy - job.busy_at_submit), x.shape[0], len(batch),
                ))  # fmt: skip
            lo += n

    def _call(self, op: str, setting: DecodeSetting, x: Tensor) -> tuple[Tensor, float]:
        runner = self.runner(setting)  # made here, in the worker thread, on first use
        t0 = time.perf_counter()
        out = runner.encode(x) if op == ENCODE else runner.decode(x)
        out = out.float().cpu()
        return out, (time.perf_counter() - t0) * 1e3
