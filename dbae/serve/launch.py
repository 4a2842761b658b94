"""``dbae serve`` as a child process on a free loopback port (the browser test, the serve
benchmark and the screenshot script use it)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

#: what ``dbae serve`` prints, followed by its URL, once it listens
URL_MARK = "dbae serve: open "


def serve_command(ckpt: str | Path, *args: str) -> list[str]:
    """``python -m dbae.cli.main serve --ckpt CKPT --host 127.0.0.1 --port 0 ARGS``."""
    return [sys.executable, "-m", "dbae.cli.main", "serve", "--ckpt", str(ckpt), "--host", "127.0.0.1", "--port", "0",
            *args]  # fmt: skip


def _die_with_parent() -> None:  # runs in the child before exec
    """Linux: the server gets SIGTERM when its parent dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerError(RuntimeError):
    """The server did not start."""


class ServeProcess:
    """A ``dbae serve`` child process: its output lines (stdout, read as they come, so the
    server never blocks on a full pipe), its stderr (in a temporary file), its URL once it
    listens. Call :meth:`stop` in every case (:func:`serve_process` does)."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        self.lines: list[str] = []
        self.url: str | None = None
        self.startup_s: float | None = None
        self.exit_code: int | None = None
        self._found = threading.Event()
        fd, self._stderr_path = tempfile.mkstemp(prefix="dbae_serve_", suffix=".stderr")
        os.close(fd)
        self._stderr = open(self._stderr_path, "ab")  # noqa: SIM115  (O_APPEND: the server's writes go at the end)
        self._t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, text=True, bufsize=1,
            env=env, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )  # fmt: skip
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True, name="dbae-serve-stdout")
        self._reader.start()

    def wait_ready(self, timeout: float) -> str:
        """The URL, once the server listens (its start fits a classifier and warms the runner
        up: seconds). ServerError if it exits first or prints no URL within ``timeout`` s."""
        while not self._found.wait(0.1):
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise ServerError(f"dbae serve exited with status {self.proc.returncode} before it served:\n"
                                  + "\n".join(self.lines) + "\n" + self.stderr_tail())  # fmt: skip
            if time.perf_counter() - self._t0 > timeout:
                raise ServerError(f"dbae serve printed no URL within {timeout:g} s:\n" + "\n".join(self.lines))
        self.startup_s = time.perf_counter() - self._t0
        assert self.url is not None
        return self.url

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.url is None and line.startswith(URL_MARK):
                self.url = line[len(URL_MARK):].split()[0]
                self._found.set()

    def stderr_tail(self, chars: int = 4000) -> str:
        try:
            return Path(self._stderr_path).read_bytes().decode("utf-8", "replace")[-chars:]
        except OSError:
            return ""

    def cpu_s(self) -> float | None:
        """The server's user + system CPU seconds (Linux), else None."""
        try:
            with open(f"/proc/{self.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM (uvicorn shuts down cleanly), SIGKILL after ``grace`` seconds; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace)
        self.exit_code = self.proc.returncode
        self._reader.join(2)
        self._stderr.close()
        return self.exit_code

    def remove_files(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._stderr_path)


@contextlib.contextmanager
def serve_process(ckpt: str | Path, *args: str, timeout: float = 300.0,
                  env: dict[str, str] | None = None) -> Iterator[ServeProcess]:  # fmt: skip
    """``dbae serve --ckpt CKPT ARGS`` on a free loopback port while the block runs, ready
    (its :attr:`~ServeProcess.url` set); stopped and its files removed afterwards."""
    server = ServeProcess(serve_command(ckpt, *args), env)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()
        server.remove_files()
