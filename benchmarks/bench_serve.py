"""Benchmark of ``dbae serve`` under concurrent slider drags (not a test).

Starts the real server (``python -m dbae.cli.main serve --port 0``, loopback only) as a
subprocess, then, for each client count of --clients, runs that many concurrent websocket
clients (the ``websockets`` package's asyncio client) for --seconds: every client uploads a
held-out image once (or ``pick``s it), waits for its input and reconstruction frames, then
drags sliders like a user's mouse: an ``edit`` message every --interval-ms (16 ms: 60 Hz input
events) with changing scales, one slider at a time (no classifier: the interpolation alpha
towards a second image instead). Slider-to-frame latency is the arrival time of an edit frame
minus the send time of the message whose ``seq`` the frame carries. When the time is up the
clients stop and wait for the frame of their last edit (newest wins: it must come).

Reported per client count: frames/s (total and per client), p50 / p95 / max slider-to-frame
latency, edits sent, edit frames received, coalesced edits (the sum of the frames'
``coalesced``), errors (error messages received, and client-side failures: both must be 0),
runner calls and mean rows per call (batching; ``/api/stats`` deltas), the server's RSS before
and after, its CPU use and the client process's, and the server's own overhead per edit frame
(everything but the runner calls: ``frame_overhead_ms / frame_runner_ms``) as a share of the
runner time. Then a memory check: --cycles connect / upload / disconnect cycles after
--warmup-cycles, with the server's RSS after the warm-up and after the cycles.

    python benchmarks/bench_serve.py --ckpt runs/shapes16                      # 1, 4, 16 clients, 10 s each
    python benchmarks/bench_serve.py --ckpt runs/shapes16 --max-batch 1         # batching off, to compare
    python benchmarks/bench_serve.py --ckpt runs/shapes16 --smoke --json out.json   # CI: 1 client, 1 s
    python benchmarks/bench_serve.py --ckpt runs/shapes16 --hostile 8           # hostile neighbours

Hostile neighbours (``--hostile N``): one well-behaved client drags sliders for --seconds
alone, then again beside N clients that each load two images and ask for a 16-image strip
at 10 steps every --interval-ms (newest wins on the server: each always has one waiting).
Reported: the well-behaved client's p50 / p95 slider-to-frame latency beside them against
its p95 alone in the same run, and the strips the others got.

The clients run in this process, on the same CPU cores as the server: on a 2-core machine
they take a share of it (see the client CPU column), so the numbers are those a browser on the
same machine would see, not the server's alone. --threads sets the server's CPU threads per
runner call (``dbae serve --threads``; its default is half the cores), to compare.

Each phase checks its accounting (``checks`` in the JSON): edits sent = edit frames received +
coalesced edits (every edit is rendered or folded into a newer one), the server's edit frames
and its runner rows = the frames received (one row per edit), runner calls <= frames, and
frames arrive in seq order. The memory check also expects no connection left open.

Exit status 0 when everything ran without an error message, a client-side failure or a
failed check; 1 otherwise (130 when interrupted; the server is stopped in every case, and
on Linux also when this process is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import math
import os
import platform
import signal
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from dbae.serve.launch import ServeProcess, ServerError, serve_command
from dbae.serve.protocol import pack, unpack

try:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed
except ImportError:  # pragma: no cover
    raise SystemExit("bench_serve.py needs websockets >= 13 (pip install 'dbae[serve]')") from None

#: the page's slider range (dbae/serve/static/app.js)
SLIDER = 1.5
#: seconds a simulated user drags one slider before moving to the next
HOLD_S = 1.5
#: period of the back-and-forth drag
PERIOD_S = 2.0


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def get_json(url: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310  (our loopback server)
        return json.loads(r.read())


def get_bytes(url: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310
        return r.read()


# ----- one client -----


class Client:
    """One websocket connection of a simulated user."""

    def __init__(self, index: int, bench: Bench) -> None:
        self.index = index
        self.bench = bench
        self.ws = None
        self.hello: dict = {}
        self.errors: list[dict] = []  # error messages of the server
        self.failures: list[str] = []  # what went wrong on this side (timeouts, closed sockets, bad frames)
        self.seq = 0
        self.sent: dict[int, float] = {}
        self.latencies_ms: list[float] = []
        self.frames = 0
        self.coalesced = 0
        self.out_of_order = 0
        self.timings: dict[str, list[float]] = {"server_ms": [], "waited_ms": [], "queue_ms": [], "decode_ms": [],
                                                "image_ms": [], "batch": []}  # fmt: skip
        self.scales: list[float] = []  # the sliders' positions
        self.final_seq: int | None = None
        self.last_frame_seq: int | None = None
        self.done = asyncio.Event()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def open(self) -> None:
        b = self.bench
        self.ws = await connect(b.ws_url, compression=None, open_timeout=b.timeout, max_size=2**24)
        self.hello = json.loads(await asyncio.wait_for(self.ws.recv(), b.timeout))
        if self.hello.get("type") != "hello":
            raise RuntimeError(f"the first message was not hello: {str(self.hello)[:200]}")

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def _frame(self, want: set[tuple[str, int]]) -> None:
        """Receive until a frame of each (kind, seq) in ``want`` came (error messages are
        recorded; an error about one of those seqs fails the wait)."""
        want = set(want)
        while want:
            msg = await asyncio.wait_for(self.ws.recv(), self.bench.timeout)
            if isinstance(msg, str):
                m = json.loads(msg)
                if m.get("type") == "error":
                    self.errors.append(m)
                    if any(m.get("seq") == s for _, s in want):
                        raise RuntimeError(f"server error: {m.get('message')}")
                continue
            header, _ = unpack(msg)
            want.discard((header.get("kind"), header.get("seq")))

    async def load(self, slot: str, image: bytes | None, index: int) -> None:
        """Upload ``image`` (or pick held-out ``index`` when None) as ``slot``; wait for its frames."""
        seq = self.next_seq()
        if image is None:
            await self.ws.send(json.dumps({"type": "pick", "seq": seq, "slot": slot, "index": index}))
        else:
            await self.ws.send(pack({"type": "upload", "seq": seq, "slot": slot}, image))
        await self._frame({("input", seq), ("recon", seq)} if slot == "a" else {("input", seq)})

    # -- the slider drag --
    def edit_message(self, seq: int, elapsed: float) -> dict:
        """A drag: one slider at a time moving back and forth, the others where they were left."""
        wave = math.sin(2 * math.pi * elapsed / PERIOD_S + self.index)
        k = len(self.hello.get("attributes", []))
        if k == 0:  # no sliders: drag the interpolation alpha (a second image was loaded)
            return {"type": "edit", "seq": seq, "scales": [], "alpha": round(0.5 + 0.5 * wave, 3)}
        if len(self.scales) != k:
            self.scales = [0.0] * k
        j = (self.index + int(elapsed / HOLD_S)) % k
        self.scales[j] = round(SLIDER * wave, 2)
        return {"type": "edit", "seq": seq, "scales": list(self.scales)}

    async def drag(self, start: float, seconds: float, interval: float, drain: float) -> None:
        receiver = asyncio.create_task(self._receive_edits())
        try:
            await self._send_edits(start, seconds, interval)
            self.final_seq = self.seq if self.sent else None
            if self.final_seq is None or self.last_frame_seq == self.final_seq:
                self.done.set()
            try:
                await asyncio.wait_for(self.done.wait(), drain)
            except asyncio.TimeoutError:
                self.failures.append(f"client {self.index}: no frame for its last edit (seq {self.final_seq}) "
                                     f"within {drain:g} s; last frame was seq {self.last_frame_seq}")  # fmt: skip
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)

    async def _send_edits(self, start: float, seconds: float, interval: float) -> None:
        # users are not in step: client i's events start i/n of an interval late
        t = start + interval * self.index / max(1, self.bench.n_clients)
        end = start + seconds
        while True:
            now = time.perf_counter()
            if t > now:
                await asyncio.sleep(t - now)
            now = time.perf_counter()
            if now >= end:
                return
            seq = self.next_seq()
            text = json.dumps(self.edit_message(seq, now - start))
            self.sent[seq] = time.perf_counter()
            try:
                await self.ws.send(text)
            except ConnectionClosed as exc:
                self.failures.append(f"client {self.index}: connection closed while sending ({exc})")
                self.done.set()
                return
            t = max(t + interval, now)  # a late loop sends no catch-up burst (neither does a mouse)

    async def _receive_edits(self) -> None:
        try:
            while True:
                msg = await self.ws.recv()
                now = time.perf_counter()
                if isinstance(msg, str):
                    m = json.loads(msg)
                    if m.get("type") == "error":
                        self.errors.append(m)
                    continue
                header, payload = unpack(msg)
                if header.get("kind") != "edit":
                    self.failures.append(f"client {self.index}: unexpected {header.get('kind')} frame while dragging")
                    continue
                seq = header.get("seq")
                if seq not in self.sent:
                    self.failures.append(f"client {self.index}: edit frame of seq {seq}, which it never sent")
                    continue
                if self.last_frame_seq is not None and seq <= self.last_frame_seq:
                    self.out_of_order += 1
                if not payload.startswith(b"\x89PNG"):
                    self.failures.append(f"client {self.index}: edit frame {seq} is not a PNG")
                self.latencies_ms.append((now - self.sent[seq]) * 1e3)
                self.frames += 1
                self.coalesced += int(header.get("coalesced", 0))
                for key, values in self.timings.items():
                    v = header.get("timings", {}).get(key)
                    if isinstance(v, (int, float)):
                        values.append(float(v))
                self.last_frame_seq = seq
                if seq == self.final_seq:
                    self.done.set()
        except ConnectionClosed as exc:
            self.failures.append(f"client {self.index}: connection closed while dragging ({exc})")
            self.done.set()


# ----- the benchmark -----


class Bench:
    def __init__(self, args: argparse.Namespace, server: ServeProcess) -> None:
        self.args = args
        self.server = server
        self.base = server.url.rstrip("/")
        self.ws_url = "ws://" + self.base.split("://", 1)[1] + "/ws"
        self.timeout = args.timeout
        self.n_clients = 1
        self.info = get_json(self.base + "/api/info")
        n = int(self.info.get("heldout", 0))
        self.heldout = [get_bytes(f"{self.base}/api/heldout/{i}.png") for i in range(n)]
        s = int(self.info["image_size"])
        rng = np.random.default_rng(0)
        synthetic = []
        for w, h, fmt in ((s, s, "PNG"), (3 * s, 2 * s, "JPEG"), (2 * s + 7, 4 * s, "WEBP")):  # the last two resized
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
            synthetic.append(buf.getvalue())
        #: images the clients upload: the held-out ones (the model's kind of image), else noise
        self.images = self.heldout or synthetic[:1]
        #: images of the memory cycles: also files of other sizes and formats (resized by the server),
        #: first, so that the warm-up meets every format and size
        self.cycle_images = synthetic[1:] + self.images

    def stats(self) -> dict:
        return get_json(self.base + "/api/stats")

    def image(self, i: int, pool: list[bytes]) -> bytes | None:
        return None if self.args.source == "pick" else pool[i % len(pool)]

    async def phase(self, n: int, alone: bool = True) -> dict:
        """n clients dragging sliders for --seconds (``alone``: no other client uses the
        server meanwhile, so its counters are theirs and are checked against them)."""
        a = self.args
        self.n_clients = n
        rss_before = (await asyncio.to_thread(self.stats))["rss_mb"]
        clients = [Client(i, self) for i in range(n)]
        result: dict = {"clients": n}
        try:
            t0 = time.perf_counter()
            await asyncio.gather(*(c.open() for c in clients))
            await asyncio.gather(*(c.load("a", self.image(c.index, self.images), c.index % max(1, len(self.heldout)))
                                   for c in clients))  # fmt: skip
            if not clients[0].hello.get("attributes"):  # no sliders: the clients drag alpha towards a second image
                await asyncio.gather(*(c.load("b", self.image(c.index + 1, self.images),
                                              (c.index + 1) % max(1, len(self.heldout))) for c in clients))  # fmt: skip
            result["setup_s"] = time.perf_counter() - t0
            before = await asyncio.to_thread(self.stats)
            cpu0, client_cpu0 = self.server.cpu_s(), time.process_time()
            start = time.perf_counter() + 0.05
            await asyncio.gather(*(c.drag(start, a.seconds, a.interval_ms / 1e3, a.drain_timeout) for c in clients))
            elapsed = time.perf_counter() - start
            cpu1, client_cpu1 = self.server.cpu_s(), time.process_time()
            after = await asyncio.to_thread(self.stats)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        rss_after = (await asyncio.to_thread(self.stats))["rss_mb"]
        d = {k: after[k] - before[k] for k in ("runner_calls", "runner_rows", "edit_frames", "coalesced", "errors",
                                                "frame_runner_ms", "frame_overhead_ms", "frame_image_ms")}  # fmt: skip
        lat = [x for c in clients for x in c.latencies_ms]
        frames = sum(c.frames for c in clients)
        edits = sum(len(c.sent) for c in clients)
        coalesced = sum(c.coalesced for c in clients)
        per_client = [c.frames / elapsed for c in clients]
        checks = {
            "edits_sent == frames + coalesced": edits == frames + coalesced,
            "server edit frames == frames received": d["edit_frames"] == frames,
            "server coalesced == frames' coalesced": d["coalesced"] == coalesced,
            "runner rows == frames (one row per edit)": d["runner_rows"] == frames,
            "runner calls <= frames": d["runner_calls"] <= frames,
            "frames in seq order": all(c.out_of_order == 0 for c in clients),
        }
        if not alone:  # the server's counters include the others' work
            checks = {k: v for k, v in checks.items() if k in ("edits_sent == frames + coalesced", "frames in seq order")}
        result.update({
            "seconds": elapsed,
            "frames_per_s": frames / elapsed,
            "frames_per_s_per_client": frames / elapsed / n,
            "frames_per_s_min_client": min(per_client),
            "latency_ms": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "max": max(lat) if lat else None,
                           "mean": float(np.mean(lat)) if lat else None},  # fmt: skip
            "latencies_ms": [round(x, 3) for x in lat],  # every edit frame's, client by client
            "latency_p95_ms_worst_client": max((percentile(c.latencies_ms, 95) or 0.0) for c in clients),
            "edits_sent": edits,
            "frames": frames,
            "coalesced": coalesced,
            "errors": sum(len(c.errors) for c in clients),
            "error_messages": [e.get("message") for c in clients for e in c.errors][:10],
            "failures": [f for c in clients for f in c.failures][:20],
            "failure_count": sum(len(c.failures) for c in clients),
            "server_errors": d["errors"],
            "runner_calls": d["runner_calls"],
            "runner_rows": d["runner_rows"],
            "rows_per_call": d["runner_rows"] / d["runner_calls"] if d["runner_calls"] else None,
            "frame_runner_ms": d["frame_runner_ms"] / d["edit_frames"] if d["edit_frames"] else None,
            "frame_overhead_ms": d["frame_overhead_ms"] / d["edit_frames"] if d["edit_frames"] else None,
            "frame_image_ms": d["frame_image_ms"] / d["edit_frames"] if d["edit_frames"] else None,
            "overhead_share": d["frame_overhead_ms"] / d["frame_runner_ms"] if d["frame_runner_ms"] else None,
            "frame_timings_mean": {k: float(np.mean(v)) if v else None
                                   for k, v in ((k, [x for c in clients for x in c.timings[k]]) for k in clients[0].timings)},  # fmt: skip
            "server_cpu": (cpu1 - cpu0) / elapsed if cpu0 is not None and cpu1 is not None else None,
            "client_cpu": (client_cpu1 - client_cpu0) / elapsed,
            "rss_mb_before": rss_before,
            "rss_mb_after": rss_after,
            "checks": checks,
            "ok": all(checks.values()),
        })  # fmt: skip
        return result

    async def cycle(self, i: int) -> None:
        c = Client(i, self)
        try:
            await c.open()
            await c.load("a", self.image(i, self.cycle_images), i % max(1, len(self.heldout)))
        finally:
            await c.close()
        if c.errors:
            raise RuntimeError(f"cycle {i}: server error: {c.errors[0].get('message')}")

    async def hostile(self, n: int) -> dict:
        """One client dragging alone, then beside n clients flooding 16-image strips at 10 steps."""
        a = self.args
        quiet = await self.phase(1)
        flooders = [Client(1000 + i, self) for i in range(n)]
        strips = [0] * n
        errors: list[str] = []
        stop = asyncio.Event()

        async def flood(i: int, c: Client) -> None:
            async def receive() -> None:
                while True:
                    msg = await c.ws.recv()
                    if isinstance(msg, str):
                        m = json.loads(msg)
                        if m.get("type") == "error":
                            errors.append(m.get("message", ""))
                    elif unpack(msg)[0].get("kind") == "strip":
                        strips[i] += 1

            receiver = asyncio.create_task(receive())
            try:
                while not stop.is_set():
                    await c.ws.send(json.dumps({"type": "strip", "seq": c.next_seq(), "count": 16, "steps": 10}))
                    await asyncio.sleep(a.interval_ms / 1e3)
            except ConnectionClosed as exc:
                errors.append(f"flooder {i}: connection closed ({exc})")
            finally:
                receiver.cancel()
                await asyncio.gather(receiver, return_exceptions=True)

        try:
            await asyncio.gather(*(c.open() for c in flooders))
            for c in flooders:
                await c.load("a", self.image(c.index, self.images), c.index % max(1, len(self.heldout)))
                await c.load("b", self.image(c.index + 1, self.images), (c.index + 1) % max(1, len(self.heldout)))
            tasks = [asyncio.create_task(flood(i, c)) for i, c in enumerate(flooders)]
            await asyncio.sleep(1.0)  # the flood under way
            t0 = time.perf_counter()
            loaded = await self.phase(1, alone=False)
            seconds = time.perf_counter() - t0
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            await asyncio.gather(*(c.close() for c in flooders))
        q, l = quiet["latency_ms"], loaded["latency_ms"]
        return {
            "flooders": n, "alone": quiet, "beside": loaded,
            "p95_alone_ms": q["p95"], "p50_beside_ms": l["p50"], "p95_beside_ms": l["p95"],
            "p50_ratio": l["p50"] / q["p95"] if q["p95"] and l["p50"] else None,
            "p95_ratio": l["p95"] / q["p95"] if q["p95"] and l["p95"] else None,
            "strips_per_s": sum(strips) / seconds, "strips_min_flooder": min(strips) if strips else 0,
            "flooder_errors": errors[:10], "flooder_error_count": len(errors),
        }

    async def memory(self) -> dict:
        """--warmup-cycles then --cycles connect / upload / disconnect cycles, one at a time."""
        a = self.args
        failures: list[str] = []

        series: list[list[float]] = []  # [cycles done, RSS MB] during the measured cycles

        async def run(first: int, count: int, record: bool) -> None:
            for i in range(first, first + count):
                try:
                    await self.cycle(i)
                except Exception as exc:  # noqa: BLE001  (recorded; the benchmark goes on)
                    failures.append(f"cycle {i}: {type(exc).__name__}: {exc}")
                done = i - first + 1
                if record and (done % max(1, count // 10) == 0 or done == count):
                    series.append([done, (await asyncio.to_thread(self.stats))["rss_mb"]])

        s0 = await asyncio.to_thread(self.stats)
        await run(0, a.warmup_cycles, False)
        s1 = await asyncio.to_thread(self.stats)
        series.append([0, s1["rss_mb"]])
        t0 = time.perf_counter()
        await run(a.warmup_cycles, a.cycles, True)
        seconds = time.perf_counter() - t0
        s2 = await asyncio.to_thread(self.stats)
        for _ in range(50):  # the server frees a connection's state when it sees the close
            if s2["connections_open"] == 0:
                break
            await asyncio.sleep(0.1)
            s2 = await asyncio.to_thread(self.stats)
        growth = s2["rss_mb"] - s1["rss_mb"]
        return {
            "warmup_cycles": a.warmup_cycles,
            "cycles": a.cycles,
            "seconds": seconds,
            "rss_mb_start": s0["rss_mb"],
            "rss_mb_after_warmup": s1["rss_mb"],
            "rss_mb_after_cycles": s2["rss_mb"],
            "rss_growth_mb": growth,
            "rss_growth_kb_per_cycle": growth * 1e3 / a.cycles if a.cycles else None,
            "rss_series": series,
            "connections_open_after": s2["connections_open"],
            "connections_total": s2["connections_total"] - s0["connections_total"],
            "uploads": s2["uploads"] - s0["uploads"],
            "server_errors": s2["errors"] - s0["errors"],
            "failures": failures[:20],
            "failure_count": len(failures),
        }


def machine_info(argv: list[str]) -> dict:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *argv]),
        "argv": argv,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "versions": {p: version(p) for p in ("dbae", "fastapi", "uvicorn", "websockets", "starlette", "pillow")},
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = (f"{'clients':>7} {'frames/s':>9} {'/client':>8} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} {'edits':>6} "
          f"{'frames':>6} {'coalesced':>9} {'errors':>6} {'calls':>6} {'rows/call':>9} {'overhead':>8} "
          f"{'srv cpu':>7} {'cli cpu':>7} {'RSS MB before>after':>19}")  # fmt: skip


def format_row(r: dict) -> str:
    lat = r["latency_ms"]
    rss = f"{fmt(r['rss_mb_before'], '.1f')}>{fmt(r['rss_mb_after'], '.1f')}"
    return (f"{r['clients']:7d} {r['frames_per_s']:9.1f} {r['frames_per_s_per_client']:8.1f} {fmt(lat['p50'], '7.1f')} "
            f"{fmt(lat['p95'], '7.1f')} {fmt(lat['max'], '7.1f')} {r['edits_sent']:6d} {r['frames']:6d} "
            f"{r['coalesced']:9d} {r['errors'] + r['failure_count']:6d} {r['runner_calls']:6d} "
            f"{fmt(r['rows_per_call'], '9.2f')} {fmt(r['overhead_share'], '8.1%')} {fmt(r['server_cpu'], '7.0%')} "
            f"{fmt(r['client_cpu'], '7.0%')} {rss:>19}")  # fmt: skip


async def run_all(bench: Bench) -> dict:
    a = bench.args
    out: dict = {"runs": []}
    print(HEADER, flush=True)
    for n in a.clients:
        r = await bench.phase(n)
        out["runs"].append(r)
        print(format_row(r), flush=True)
        for f in r["failures"] + [f"server error message: {m}" for m in r["error_messages"]]:
            print(f"  ! {f}", flush=True)
        for name, ok in r["checks"].items():
            if not ok:
                print(f"  ! check failed: {name}", flush=True)
    if a.hostile:
        h = await bench.hostile(a.hostile)
        out["hostile"] = h
        for r in (h["alone"], h["beside"]):
            print(format_row(r), flush=True)
        print(f"hostile neighbours: {h['flooders']} clients flooding 16-image strips at 10 steps "
              f"({h['strips_per_s']:.1f} strips/s in all, the least served got {h['strips_min_flooder']}): the "
              f"well-behaved client's p50 {fmt(h['p50_beside_ms'], '.1f')} ms, p95 {fmt(h['p95_beside_ms'], '.1f')} ms "
              f"beside them, p95 {fmt(h['p95_alone_ms'], '.1f')} ms alone (x{fmt(h['p50_ratio'], '.2f')} / "
              f"x{fmt(h['p95_ratio'], '.2f')})", flush=True)  # fmt: skip
        for f in h["flooder_errors"]:
            print(f"  ! flooder: {f}", flush=True)
    if a.cycles > 0:
        m = await bench.memory()
        out["memory"] = m
        print(f"memory: {m['warmup_cycles']} warm-up + {m['cycles']} connect/upload/disconnect cycles in "
              f"{m['seconds']:.1f} s: RSS {fmt(m['rss_mb_start'], '.1f')} MB at start, "
              f"{fmt(m['rss_mb_after_warmup'], '.1f')} MB after the warm-up, {fmt(m['rss_mb_after_cycles'], '.1f')} MB "
              f"after the cycles ({m['rss_growth_mb']:+.1f} MB, {fmt(m['rss_growth_kb_per_cycle'], '+.1f')} kB per cycle); "
              f"{m['connections_open_after']} connections open after", flush=True)  # fmt: skip
        for f in m["failures"]:
            print(f"  ! {f}", flush=True)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint served (e.g. runs/shapes16)")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16], help="client counts, one phase each")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of slider drags per phase")
    p.add_argument("--interval-ms", type=float, default=16.0, help="ms between a client's edit messages (16: 60 Hz)")
    p.add_argument("--source", choices=["upload", "pick"], default="upload",
                   help="clients upload a held-out image's PNG (default) or pick it by index")
    p.add_argument("--cycles", type=int, default=200, help="connect/upload/disconnect cycles of the memory check (0: none)")
    p.add_argument("--warmup-cycles", type=int, default=20, help="cycles before the memory check's first RSS")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (1: batching off)")
    p.add_argument("--steps", type=int, help="the server's default decode steps (its default: 4)")
    p.add_argument("--sampler", choices=["euler", "heun"], help="the server's default sampler")
    p.add_argument("--runner", help="the server's --runner (default auto)")
    p.add_argument("--device", default="cpu", help="the server's --device (default cpu)")
    p.add_argument("--classifier", type=Path, help="the server's --classifier (default: the shapes models' automatic one)")
    p.add_argument("--no-auto-classifier", action="store_true",
                   help="the server fits no classifier: clients drag the interpolation alpha instead of sliders")
    p.add_argument("--threads", type=int, help="the server's --threads (CPU threads per runner call; default its own)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a connection or a first frame")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to wait for the frame of a client's last edit")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for the server to start")
    p.add_argument("--json", type=Path, default=Path("runs/bench_serve.json"))
    p.add_argument("--hostile", type=int, default=0, metavar="N",
                   help="hostile neighbours: one client dragging alone, then beside N clients flooding 16-image "
                        "strips at 10 steps (after the --clients phases; --clients 0 phases: pass --clients 1)")
    p.add_argument("--smoke", action="store_true", help="1 client for 1 s and a few cycles: checks the script (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.seconds, args.cycles, args.warmup_cycles = [1], 1.0, 10, 2
    if any(n < 1 for n in args.clients) or args.seconds <= 0 or args.interval_ms <= 0 or args.cycles < 0 \
            or args.warmup_cycles < 0 or args.max_batch < 1 or args.hostile < 0 \
            or (args.threads is not None and args.threads < 1):  # fmt: skip
        p.error("--clients, --max-batch and --threads must be >= 1, --seconds and --interval-ms > 0, cycles >= 0")
    return args


def server_command(args: argparse.Namespace) -> list[str]:
    options = ["--max-batch", str(args.max_batch), "--device", args.device]
    for flag, value in (("--steps", args.steps), ("--sampler", args.sampler), ("--runner", args.runner),
                        ("--classifier", args.classifier), ("--threads", args.threads)):  # fmt: skip
        if value is not None:
            options += [flag, str(value)]
    if args.no_auto_classifier:
        options.append("--no-auto-classifier")
    return serve_command(args.ckpt, *options)


def _sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt  # runs the finally clauses: the server is stopped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    meta = machine_info([sys.argv[0], *argv])
    result: dict = {"meta": meta, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    print(f"{meta['date']}  cpus {meta['cpu_count']}  torch {meta['torch']}  load {meta['load_average_at_start']}")
    server = None
    ok = False
    return_code = 1
    try:
        server = ServeProcess(server_command(args))
        server.wait_ready(args.start_timeout)
        print(f"server pid {server.pid} at {server.url} (started in {server.startup_s:.1f} s, max batch "
              f"{args.max_batch})", flush=True)  # fmt: skip
        bench = Bench(args, server)
        result["info"] = {k: bench.info.get(k) for k in ("preset", "step", "image_size", "z_dim", "runner", "device",
                                                         "precision", "batching", "steps", "sampler", "heldout")}  # fmt: skip
        result["info"]["attributes"] = len(bench.info.get("attributes", []))
        print(f"model {result['info']['preset']} step {result['info']['step']}, runner {result['info']['runner']} "
              f"({result['info']['precision']}, {result['info']['sampler']} x{result['info']['steps']}), "
              f"{result['info']['attributes']} sliders, {args.source} of the image", flush=True)  # fmt: skip
        result.update(asyncio.run(run_all(bench)))
        result["stats_end"] = bench.stats()
        ok = True
    except ServerError as exc:
        print(f"bench_serve: {exc}", file=sys.stderr)
        result["server_error"] = str(exc)
    except KeyboardInterrupt:
        print("interrupted: stopping the server", file=sys.stderr)
        return_code = 130
    finally:
        if server is not None:
            server.stop()
            result["server"] = {"pid": server.pid, "url": server.url, "command": server.cmd, "startup_s": server.startup_s,
                                "stdout": server.lines, "stderr_tail": server.stderr_tail(), "exit_code": server.exit_code}  # fmt: skip
            server.remove_files()
        errors = sum(r["errors"] + r["failure_count"] + r["server_errors"] for r in result.get("runs", []))
        m = result.get("memory", {})
        errors += m.get("failure_count", 0) + m.get("server_errors", 0)
        checks_ok = all(r["ok"] for r in result.get("runs", [])) and m.get("connections_open_after", 0) == 0
        h = result.get("hostile")
        if h:
            errors += sum(r["errors"] + r["failure_count"] for r in (h["alone"], h["beside"])) + h["flooder_error_count"]
            checks_ok = checks_ok and h["alone"]["ok"] and h["beside"]["ok"]
        result["errors"] = errors
        result["ok"] = ok and errors == 0 and checks_ok
        why = [] if ok else ["the benchmark did not finish"]
        why += [f"{errors} errors or failures"] if errors else []
        why += [] if checks_ok else ["a consistency check failed (or connections stayed open)"]
        result["failed_because"] = why
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}" + ("" if result["ok"] else f"  (FAILED: {'; '.join(why)})"), flush=True)
    return 0 if result["ok"] else return_code


if __name__ == "__main__":
    raise SystemExit(main())
