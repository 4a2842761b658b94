"""torch.distributed set-up and teardown for training launched by ``torchrun``.

``torchrun`` starts one process per device and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`session` reads it, joins the process group (NCCL on CUDA, gloo on the CPU), and
leaves it when the run ends or fails. Without ``torchrun`` (no ``WORLD_SIZE``, or 1) it
is a single process and nothing distributed is set up: ``dbae train`` runs unchanged.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..errors import ConfigError

#: seconds a rank waits in a collective for the others before it fails (env DBAE_DIST_TIMEOUT_S)
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: rank ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        """Whether other processes take part (collectives are then real)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes samples and checkpoints."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks, in place (the tensor itself with one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects; small ones: a path, a message)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def in_sync(self, modules: list[torch.nn.Module]) -> bool:
        """Whether every rank holds bit-identical parameters and buffers in ``modules``
        (compares a float64 fingerprint of each tensor across ranks)."""
        if not self.enabled:
            return True
        parts = [
            t.detach().double().sum().reshape(1) + t.detach().double().abs().sum().reshape(1) * 1e-3
            for m in modules
            for t in [*m.parameters(), *m.buffers()]
        ]
        local = torch.cat(parts).to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        return all(torch.equal(gathered[0], g) for g in gathered[1:])

    def broadcast_modules(self, modules: list[torch.nn.Module]) -> None:
        """Copy rank 0's parameters and buffers of ``modules`` to every rank."""
        if not self.enabled:
            return
        with torch.no_grad():
            for m in modules:
                for t in [*m.parameters(), *m.buffers()]:
                    dist.broadcast(t.data, src=0)


def all_ranks(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised alike on every rank (a configuration mistake, a diverged loss
    seen through the all-reduced statistics), so that only rank 0 reports it."""
    exc.all_ranks = True  # type: ignore[attr-defined]
    return exc


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def env_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun)."""
    try:
        return _env_int("RANK") or 0
    except ConfigError:
        return 0


def _device_for(name: str, local_rank: int, world_size: int) -> torch.device:
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise all_ranks(ConfigError("--device cuda was asked for but this PyTorch build sees no CUDA device"))
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                f"this node runs local rank {local_rank} but sees only {count} CUDA device(s): "
                f"--nproc_per_node must not exceed the GPUs per node"
            )
        return torch.device("cuda", local_rank)
    raise all_ranks(ConfigError(
        f"--device {name} cannot be used with torchrun ({world_size} processes): use --device auto, cuda or cpu; "
        "each process then takes the device of its LOCAL_RANK (limit the GPUs with CUDA_VISIBLE_DEVICES)"
    ))


def context_from_env(device: str) -> DistContext | None:
    """The job's layout from torchrun's environment, or None when this is a single process."""
    world = _env_int("WORLD_SIZE")
    if world is None or world == 1:
        return None
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    missing = [n for n, v in (("RANK", rank), ("LOCAL_RANK", local_rank)) if v is None]
    missing += [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if missing:
        raise all_ranks(ConfigError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: launch distributed training with torchrun"
        ))
    if world < 1 or not (0 <= rank < world):
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return DistContext(rank, world, local_rank, _device_for(device, local_rank, world))


@contextmanager
def session(device: str = "auto") -> Iterator[DistContext | None]:
    """Join the torchrun job for the body (and leave it afterwards, also on an error);
    yields None without torchrun (the trainer then picks its device from ``device``).

    On an error in one rank its process leaves the group and exits; the others fail in
    their next collective (gloo: at once; NCCL: after the timeout, or sooner when torchrun,
    seeing one worker fail, stops the rest), so no rank hangs on a dead job.
    """
    ctx = context_from_env(device)
    if ctx is None:
        yield None
        return
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("DBAE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if ctx.device.type == "cuda":
        kwargs["device_id"] = ctx.device
    dist.init_process_group(**kwargs)
    try:
        yield ctx
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (leaving a broken group must not hide the real error)
            pass
