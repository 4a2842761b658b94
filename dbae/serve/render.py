"""One model, its runners, and one worker thread that runs them for every connection.

Every runner call of the server goes through :class:`Renderer`: connections submit
encode or decode jobs (their own rows of images or latents) and await the result. A
dispatcher task on the event loop takes every job that is waiting when the runner comes
free and, with batching on (``max_batch`` > 1), concatenates the jobs of one kind and
decode setting into one runner call of up to ``max_batch`` rows, then hands each job its
rows. The calls run one at a time in a single worker thread, so the event loop keeps
receiving messages (and coalescing them, see :mod:`dbae.serve.session`) while the runner
works.

Fairness between connections: every job has an owner (its connection). The dispatcher
serves owners round-robin, least recently served first: the first waiting job of the
least recently served owner sets the call's kind (encode or decode, the decode setting, and
whether it is a strip, a job of two or more rows: one-row jobs never share a call with
strips), and the call takes rows of that kind one per owner and round, so a job of L rows
(a strip of L images) costs L rows and is split over calls when others wait. A call is one
round (at most one row per
owner) unless every job waiting is of one kind and every owner of the previous call is
back among them; only then do rounds repeat up to ``max_batch`` rows (batching as before).

Pre-emption: a runner call cannot be shorter than one row, and on a CPU a call of one row
per strip-flooding connection at 10 steps costs several edits. So, while a call that holds
rows of a strip (a job of two or more rows) runs on a runner with pause points
(:attr:`dbae.export.runner.Runner.preemptible`: eager and onnxruntime-step), a waiting job of
one row (an edit, an upload's encode) of a connection that has no rows in that call is handed
to the worker thread, which runs it at the call's next pause point (before its next U-Net
evaluation), then resumes the call where it stopped. One such call at a time, with at most
one row per connection and ``max_batch`` rows; the one-row jobs that come while it waits for
its pause point join it. A well-behaved edit then waits for at most one U-Net evaluation of
a strip's call instead of the whole call, and the call still advances at least one
evaluation between two such edits. While somebody edits (see :data:`EDITING_S`), calls of
strip rows hold at most :data:`STRIP_ROWS_WHILE_EDITING` rows, so that evaluation is short.
Calls of one-row jobs only are not pre-empted (edits take turns, batched, as above). A job
handed over that its call ended before reaching goes back to the queue.

Runners are made by :func:`dbae.export.registry.factory`, one per decode setting (steps,
sampler), on first use, and kept.

Timing of each job (:class:`Rendered`): ``runner_ms`` the runner calls it was part of
(measured in the worker thread, the copy of the result to the CPU included), ``blocked_ms``
the runner time spent on other calls while it waited, ``queue_ms`` its wait for its first
call, ``rows`` / ``jobs`` the size of its (last) call, ``calls`` how many calls its rows
took, ``preempted`` whether it ran inside another call (at a pause point).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..export.registry import factory as runner_factory
from ..export.runner import DecodeSetting, Runner, pausing
from ..model import DBAE

Tensor = torch.Tensor

log = logging.getLogger("dbae.serve")

ENCODE, DECODE = "encode", "decode"

#: the longest the dispatcher waits for the connections it just served to submit again, so
#: that their jobs join the next runner call (seconds; only while batching, see _dispatch)
GATHER_S = 0.002
#: while somebody is editing (a connection with no strip waiting sent a one-row job within
#: EDITING_S seconds), a call of strip rows holds at most this many rows, so that the next
#: pause point of a strip's call, where the edit runs, is one U-Net evaluation of at most
#: this many rows away (on the 2-core CPU: 4 rows ~ 2.8 ms in onnxruntime-step, about half an
#: edit; 16 rows ~ 10 ms, more than an edit; see docs/benchmarks.md)
STRIP_ROWS_WHILE_EDITING = 4
EDITING_S = 1.0


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
    rows: int  # rows of the (last) runner call
    jobs: int  # jobs of the (last) runner call
    calls: int = 1  # runner calls its rows took
    first_call: int = 0  # the index of the call its first rows ran in (0: the renderer's first call)
    preempted: bool = False  # it ran inside another call, at one of its pause points


@dataclass(eq=False)
class _Job:
    op: str
    setting: DecodeSetting
    x: Tensor
    future: asyncio.Future
    submitted: float  # time.perf_counter()
    busy_at_submit: float  # the renderer's cumulative busy ms at submit time
    owner: int  # id() of its connection (of the job itself when none was given); no reference kept
    taken: int = 0  # rows handed to runner calls so far
    outs: list = field(default_factory=list)  # their results, in order
    runner_ms: float = 0.0
    calls: int = 0
    first_call: int = -1
    started: float | None = None

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def kind(self) -> tuple[str, DecodeSetting, bool]:
        """What may share a call: op, decode setting, and strip or not (edits never share a
        call with strips: they pre-empt them)."""
        return self.op, self.setting, self.rows > 1


@dataclass
class RendererStats:
    calls: int = 0
    rows: int = 0
    jobs: int = 0
    busy_ms: float = 0.0
    by_op: dict = field(default_factory=lambda: {ENCODE: 0, DECODE: 0})
    preemptions: int = 0  # calls run inside another call, at a pause point


class Renderer:
    """Runs encode / decode jobs of all connections on runners of ``kind`` (a name of
    :data:`dbae.export.registry.KINDS`) for ``model``, batching up to ``max_batch`` rows."""

    def __init__(self, model: DBAE, kind: str, precision: str, default: DecodeSetting, *, max_batch: int = 16,
                 editing_s: float = EDITING_S, weights_id: str | None = None) -> None:  # fmt: skip
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.editing_s = editing_s
        self.kind = kind
        self.precision = precision
        self.default = default
        self.max_batch = max_batch
        self._served_at: dict[int, int] = {}  # owner -> the call that last served it
        self._edited_at: dict[int, float] = {}  # owner -> perf_counter() of its last one-row job
        self._last_owners: set[int] = set()  # the owners of the last call
        self._make = runner_factory(kind, model, precision, weights_id=weights_id)
        self._runners: dict[DecodeSetting, Runner] = {}
        # the worker thread runs with torch's CPU thread count of now (see dbae serve --threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbae-runner",
                                            initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        self._jobs: deque[_Job] = deque()  # submitted, not yet taken by the dispatcher
        self._arrived: asyncio.Event | None = None  # set by submit
        self._task: asyncio.Task | None = None
        self._busy_done = 0.0  # ms of finished runner calls
        self._busy_since: float | None = None  # perf_counter() when the current call started
        self._started = 0  # calls started (the next call's index)
        # pre-emption: the call handed to the worker thread for the running call's next pause
        # point, and the ms of such calls run during the current call (not counted in its own
        # runner_ms)
        self._handoff_lock = threading.Lock()
        self._handoff: _Handoff | None = None
        self._paused_ms = 0.0
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

    async def submit(self, op: str, setting: DecodeSetting, x: Tensor, owner: object = None) -> Rendered:
        """Run ``op`` (encode: images (B, C, H, W); decode: latents (B, d)) at ``setting``;
        ``owner``: the connection it is for (served round-robin with the others)."""
        if self._arrived is None:
            raise RuntimeError("the renderer is not started")
        future = asyncio.get_running_loop().create_future()
        job = _Job(op, setting, x, future, time.perf_counter(), self._busy_now(), id(owner))
        if owner is None:
            job.owner = id(job)
        if job.rows == 1:
            self._edited_at[job.owner] = job.submitted
            if len(self._edited_at) > 4096:  # (connections long gone)
                self._forget_old_edits()
        self._jobs.append(job)
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
            try:
                batch, waiting = self._take_batch(waiting)
                returning = len(batch)
                if batch:
                    waiting = await self._run_preempting(loop, batch, waiting)
            except Exception as exc:  # noqa: BLE001  (a bug of ours: fail the jobs waiting, never hang them)
                log.exception("the renderer's dispatcher failed; failing the jobs waiting")
                for job in waiting + list(jobs):
                    if not job.future.done():
                        job.future.set_exception(exc)
                waiting, returning = [], 0
                jobs.clear()

    async def _run_preempting(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[_Job, int, int]],
                              waiting: list[_Job]) -> list[_Job]:  # fmt: skip
        """Run ``batch``; meanwhile hand the worker, one at a time, the one-row jobs that may
        pre-empt it (see the module docstring). The jobs still waiting when it ends."""
        assert self._arrived is not None
        arrived, jobs = self._arrived, self._jobs
        runner = self._runners.get(batch[0][0].setting)
        if all(job.rows == 1 for job, _, _ in batch) or (runner is not None and not runner.preemptible):
            await self._run(loop, batch)  # (no strip in it, or no pause points: nothing to pre-empt)
            return waiting
        call = asyncio.ensure_future(self._run(loop, batch))
        running = {job.owner for job, _, _ in batch}
        handed: asyncio.Future | None = None  # the pre-empting call's delivery, while one is out
        wake = asyncio.ensure_future(arrived.wait())
        try:
            while not call.done():
                waiting += jobs
                jobs.clear()
                if handed is None or handed.done():
                    handed = self._hand_over(loop, waiting, running)
                else:  # (still waiting for its pause point: the jobs come since may join it)
                    self._join_handoff(waiting, running)
                waiting = [j for j in waiting if j.taken < j.rows]
                arrived.clear()
                if wake.done():
                    wake = asyncio.ensure_future(arrived.wait())
                out = [handed] if handed is not None and not handed.done() else []  # (its end frees the slot)
                await asyncio.wait([call, wake, *out], return_when=asyncio.FIRST_COMPLETED)
            await call
        finally:
            wake.cancel()
        back = self._take_back()  # (the call has ended: a hand-over is either run or still here)
        if handed is not None:
            await handed
        return back + waiting

    def _may_preempt(self, waiting: list[_Job], running: set[int]) -> list[_Job]:
        """The waiting jobs that may pre-empt a call of ``running`` owners, least recently
        served owner first: one row, not yet taken, of a connection not in the call."""
        served = self._served_at
        small = [j for j in waiting if j.rows == 1 and j.taken == 0 and j.owner not in running and not j.future.done()]
        return sorted(small, key=lambda j: served.get(j.owner, -1))  # (stable: in arrival order among equals)

    def _hand_over(self, loop: asyncio.AbstractEventLoop, waiting: list[_Job],
                   running: set[int]) -> asyncio.Future | None:  # fmt: skip
        """Hand the worker a call of the jobs that may pre-empt the running call (one per
        connection, of one kind and setting: the least recently served connection's); the
        task that delivers its rows, or None when there is none."""
        small = self._may_preempt(waiting, running)
        if not small:
            return None
        handoff = _Handoff(small[0].op, small[0].setting, small[0].x, Future(), [])  # (one kind: see _add_jobs)
        self._add_jobs(handoff, small)
        with self._handoff_lock:
            self._handoff = handoff
        return asyncio.ensure_future(self._deliver_handed(loop, handoff))

    def _join_handoff(self, waiting: list[_Job], running: set[int]) -> None:
        """Let jobs that came since join the hand-over, while the worker has not taken it."""
        small = self._may_preempt(waiting, running)
        if not small:
            return
        with self._handoff_lock:  # (held while the rows are added: the worker cannot take it meanwhile)
            if self._handoff is not None:
                self._add_jobs(self._handoff, small)

    def _add_jobs(self, handoff: _Handoff, jobs: list[_Job]) -> None:
        owners = {job.owner for job in handoff.jobs}
        added = False
        for job in jobs:
            if len(handoff.jobs) >= self.max_batch:
                break
            if (job.op, job.setting) == (handoff.op, handoff.setting) and job.owner not in owners:
                handoff.jobs.append(job)
                owners.add(job.owner)
                job.taken = 1
                self._served_at[job.owner] = self.stats.calls
                added = True
        if added:
            xs = [job.x for job in handoff.jobs]
            handoff.x = xs[0] if len(xs) == 1 else torch.cat(xs)

    async def _deliver_handed(self, loop: asyncio.AbstractEventLoop, handoff: _Handoff) -> None:
        try:
            out, runner_ms, started, call = await asyncio.wrap_future(handoff.done, loop=loop)
        except _GivenBack:
            return
        except Exception as exc:  # noqa: BLE001  (handed to every job of the call)
            for job in handoff.jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.stats.preemptions += 1
        self._deliver([(job, 0, 1) for job in handoff.jobs], out, runner_ms, started, call, preempted=True)

    def _take_back(self) -> list[_Job]:
        """The jobs of a hand-over that the call ended before reaching, back in the queue."""
        with self._handoff_lock:
            handoff, self._handoff = self._handoff, None
        if handoff is None:
            return []
        handoff.done.set_exception(_GivenBack())
        for job in handoff.jobs:
            job.taken = 0
        return [job for job in handoff.jobs if not job.future.done()]

    def _take_batch(self, waiting: list[_Job]) -> tuple[list[tuple[_Job, int, int]], list[_Job]]:
        """The next call's rows, as (job, first row, end row), and the jobs left waiting, in
        order. The least recently served owner's first job sets the kind (op, setting, strip
        or not); the rows of that kind are taken one per owner and round (owners in that
        order), up to ``max_batch`` rows (:data:`STRIP_ROWS_WHILE_EDITING` for strips while
        somebody edits); for one round only while a job of another kind waits or an owner of
        the last call has not submitted again."""
        live = [j for j in waiting if not j.future.done()]  # a cancelled job's connection is gone
        if not live:
            return [], []
        by_owner: dict[int, list[_Job]] = {}
        for job in live:
            by_owner.setdefault(job.owner, []).append(job)
        served = self._served_at
        owners = sorted(by_owner, key=lambda o: served.get(o, -1))  # (stable: in arrival order among equals)
        head = by_owner[owners[0]][0]
        kind = head.kind
        fill = all(j.kind == kind for j in live) and self._last_owners <= by_owner.keys()
        queues = [[j for j in by_owner[o] if j.kind == kind] for o in owners]
        limit = self.max_batch
        if head.rows > 1 and self._somebody_edits({j.owner for j in live if j.rows > 1}):
            limit = min(limit, STRIP_ROWS_WHILE_EDITING)
        take: dict[_Job, int] = {}
        rows = 0
        while rows < limit:
            added = False
            for queue in queues:
                while queue and queue[0].rows - queue[0].taken - take.get(queue[0], 0) == 0:
                    queue.pop(0)
                if queue and rows < limit:
                    take[queue[0]] = take.get(queue[0], 0) + 1
                    rows += 1
                    added = True
            if not added or not fill:
                break
        self._last_owners = {job.owner for job in take}
        batch = []
        for job, n in take.items():
            batch.append((job, job.taken, job.taken + n))
            job.taken += n
            served[job.owner] = self.stats.calls
        if len(served) > 4096:  # forget owners long gone (their ids may come back: harmless)
            for o in [o for o in served if o not in by_owner][:2048]:
                del served[o]
        return batch, [j for j in live if j.taken < j.rows]

    def _somebody_edits(self, stripping: set[int]) -> bool:
        """Whether a connection other than ``stripping`` (those with a strip waiting) sent a
        one-row job within ``editing_s`` (:data:`EDITING_S`)."""
        self._forget_old_edits()
        return any(o not in stripping for o in self._edited_at)

    def _forget_old_edits(self) -> None:
        now = time.perf_counter()
        for owner in [o for o, t in self._edited_at.items() if now - t > self.editing_s]:
            del self._edited_at[owner]

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[_Job, int, int]]) -> None:
        op, setting = batch[0][0].op, batch[0][0].setting
        parts = [job.x[lo:hi] for job, lo, hi in batch]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        started = time.perf_counter()
        self._busy_since = started
        call = self._started
        self._started += 1
        try:
            out, runner_ms = await loop.run_in_executor(self._executor, self._call, op, setting, x)
        except Exception as exc:  # noqa: BLE001  (handed to every job of the call)
            for job, _, _ in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self._busy_done += (time.perf_counter() - started) * 1e3
            self._busy_since = None
        self._deliver(batch, out, runner_ms, started, call)

    def _deliver(self, batch: list[tuple[_Job, int, int]], out: Tensor, runner_ms: float, started: float,
                 call: int, *, preempted: bool = False) -> None:  # fmt: skip
        """Hand each job of a finished call its rows; finish the jobs whose last rows these were."""
        s = self.stats
        s.calls += 1
        s.rows += out.shape[0]
        s.jobs += len(batch)
        s.busy_ms += runner_ms
        s.by_op[batch[0][0].op] += 1
        lo = 0
        for job, first, end in batch:
            n = end - first
            job.outs.append(out[lo:lo + n])
            lo += n
            job.runner_ms += runner_ms
            job.calls += 1
            if job.started is None:
                job.started, job.first_call = started, call
            if end == job.rows and not job.future.done():
                result = job.outs[0] if len(job.outs) == 1 else torch.cat(job.outs)
                blocked = max(0.0, self._busy_now() - job.busy_at_submit - job.runner_ms)
                job.future.set_result(Rendered(
                    result, job.runner_ms, (job.started - job.submitted) * 1e3, blocked, out.shape[0], len(batch),
                    job.calls, job.first_call, preempted,
                ))  # fmt: skip

    # ----- in the worker thread -----
    def _call(self, op: str, setting: DecodeSetting, x: Tensor) -> tuple[Tensor, float]:
        """One runner call; with pause points where its runner has them. Its runner ms leave
        out the calls run at its pause points."""
        runner = self.runner(setting)  # made here, in the worker thread, on first use
        self._paused_ms = 0.0
        t0 = time.perf_counter()
        if runner.preemptible:
            with pausing(self._at_pause_point):
                out = self._run_runner(runner, op, x)
        else:
            out = self._run_runner(runner, op, x)
        return out, (time.perf_counter() - t0) * 1e3 - self._paused_ms

    @staticmethod
    def _run_runner(runner: Runner, op: str, x: Tensor) -> Tensor:
        out = runner.encode(x) if op == ENCODE else runner.decode(x)
        return out.float().cpu()

    def _at_pause_point(self) -> None:
        """Run the call handed over for this pause point, if there is one (see _hand_over)."""
        if self._handoff is None:  # (read without the lock: a miss waits for the next pause point)
            return
        with self._handoff_lock:
            handoff, self._handoff = self._handoff, None
        if handoff is None:
            return
        t0 = time.perf_counter()
        call = self._started
        self._started += 1  # (the event loop starts no call while this one's call runs)
        try:
            runner = self.runner(handoff.setting)
            t1 = time.perf_counter()
            out = self._run_runner(runner, handoff.op, handoff.x)
            handoff.done.set_result((out, (time.perf_counter() - t1) * 1e3, t0, call))
        except Exception as exc:  # noqa: BLE001  (handed to its jobs)
            handoff.done.set_exception(exc)
        finally:
            self._paused_ms += (time.perf_counter() - t0) * 1e3


class _GivenBack(Exception):
    """A hand-over that its call ended before reaching (its jobs go back to the queue)."""


@dataclass(eq=False)
class _Handoff:
    op: str
    setting: DecodeSetting
    x: Tensor
    done: Future  # (out, runner_ms, started, call index), set in the worker thread
    jobs: list[_Job]
