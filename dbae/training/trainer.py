"""The training loop of SPEC section 5 (Algorithm 1), and of every other method: what a
method supplies (network, trainable parameters, optimizer, the draws and loss of a step, its
checkpoint format, its evaluation) is an :class:`~dbae.training.objective.Objective`; DBAE's
is :class:`~dbae.training.dbae_objective.DBAEObjective`, the baselines' live in
:mod:`dbae.baselines.objective`.

Exact resume: every random draw of step ``s`` (data order, t, eps, z noise, dropout) is
seeded from ``(seed, s)``, and a checkpoint stores the weights, EMA weights, optimizer and
loss-scaler state, so a run resumed from step ``s`` continues bit-for-bit like the
uninterrupted run.

Distributed (``torchrun``, :mod:`dbae.training.distributed`): the global batch of a step
(``batch_size``) is split into ``world_size x grad_accum`` equal micro-batches; rank r takes
the r-th share of the global index list and of the step's random draws (t, z noise, eps are
drawn for the whole global batch from the step's seed, :meth:`Objective.draw`, and
sliced), and each micro-batch's loss is weighted so that the averaged gradient is that of
the global batch's mean loss. Training on any number of ranks therefore follows the same
trajectory as one process with the same global batch, up to float rounding (exactly so on
the reference path with dropout 0 and tc_weight 0: dropout masks, the fused kernels' in-kernel
noise and the total-correlation estimate are per micro-batch). Rank 0 alone logs, evaluates
and writes; every rank holds the same weights and EMA (checked at every checkpoint).
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoints import atomic_write_text, checkpoint_name, load_state_strict
from ..config import Preset
from ..errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from .batches import StepBatchSampler, step_seed
from .dbae_objective import DBAEObjective
from .distributed import DistContext, all_ranks
from .ema import EMA
from .keeper import CheckpointKeeper
from .metrics_log import LossWindow, MetricsLog
from .objective import Draws, Objective

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PREFETCH_BATCHES = 4  # per DataLoader worker


@dataclass
class TrainOptions:
    """Run-time options that are not part of the model/training configuration."""

    #: the run directory (None: train in memory, write nothing)
    out: Path | None
    resume: bool = False
    #: start from this checkpoint of the objective (instead of the run directory's newest)
    resume_from: Path | None = None
    compile: bool = False
    device: str = "auto"
    progress: bool = True
    #: periodic checkpoints kept (None: all)
    keep_last: int | None = 3
    eval_images: int = 64
    log: Callable[[str], None] = print
    #: micro-batches per rank and step (gradient accumulation): the global batch
    #: ``batch_size`` is split into ``world_size * grad_accum`` equal micro-batches
    grad_accum: int = 1
    #: this process's place in a torchrun job (None: a single process on ``device``)
    dist: DistContext | None = None
    #: keep the networks' weights and the image batches channels-last (NHWC), the layout that
    #: cuDNN's fastest convolutions use on tensor-core GPUs; the fused ops run on it in place
    channels_last: bool = False
    #: enlargement of the sample grids' images (None: small images to at least
    #: ``dbae.imageio.MIN_GRID_CELL`` pixels a side; 1 keeps 1x)
    grid_zoom: int | None = None


@dataclass
class TrainResult:
    out: Path | None
    step: int
    checkpoint: Path | None  # None when training in memory
    eval: dict[str, float] | None  # None when the run was stopped early by a signal, or has no evaluation
    eval_untrained: dict[str, float] | None
    #: the signal (SIGTERM or SIGINT) that stopped the run before its last step, if any
    stopped_by: int | None = None
    #: (step, mean loss over the log window) of the steps trained now
    losses: list[tuple[int, float]] = field(default_factory=list)
    #: wall time of the loop
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but this PyTorch build sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name} was asked for but this machine has {torch.cuda.device_count()} "
                          f"CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def _chunk_seed(seed: int, step: int, chunk: int, stream: int) -> int:
    """The seed of ``stream`` for micro-batch ``chunk`` of a step; chunk 0 keeps the
    single-process seed (so one process without accumulation is unchanged)."""
    return step_seed(seed, step, stream) if chunk == 0 else step_seed(step_seed(seed, step, stream), chunk, 3)


class _LossModule(nn.Module):
    """The objective's loss as a forward, so DistributedDataParallel sees (and syncs) the call."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.model = objective.module
        self.objective = objective

    def forward(self, x0: torch.Tensor, draws: Draws, noise_seed: int):
        return self.objective.loss(self.model, x0, draws, noise_seed)


def _check_layout(batch: int, world: int, accum: int, keep_last: int | None) -> None:
    if accum < 1:
        raise all_ranks(ConfigError(f"--grad-accum must be >= 1, got {accum}"))
    if keep_last is not None and keep_last < 1:
        raise all_ranks(ConfigError(f"--keep-last must be >= 1, got {keep_last}"))
    if batch % (world * accum):
        raise all_ranks(ConfigError(
            f"the global batch (--batch-size {batch}) must split evenly into {world} rank(s) x "
            f"--grad-accum {accum} = {world * accum} micro-batches; choose a multiple of {world * accum}"
        ))


class _StopRequest:
    """Turns SIGTERM and a first Ctrl-C into a graceful stop at the end of the current step.

    The step in flight completes, a checkpoint is written, and the run can be resumed
    exactly. A second Ctrl-C interrupts at once (the last periodic checkpoint remains).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @contextmanager
    def installed(self) -> Iterator[None]:
        try:
            previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not in the main thread: leave signal handling alone
            yield
            return
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum


class Trainer:
    """The training loop of every method: ``objective`` (a DBAE :class:`Preset` stands for its
    :class:`DBAEObjective`) supplies the network, loss and checkpoint format (:mod:`.objective`).

    ``options.out`` None trains in memory (no checkpoints, logs or evaluation);
    ``options.resume_from`` starts from that checkpoint (of this objective) instead of the
    run directory's own."""

    def __init__(self, objective: Preset | Objective, options: TrainOptions) -> None:
        self.options = options
        self.out = Path(options.out) if options.out is not None else None
        self.ckpt_dir = self.out / "checkpoints" if self.out is not None else None
        self.dist = options.dist or DistContext(device=resolve_device(options.device))
        self.device = self.dist.device
        self.log = options.log if self.dist.is_main else (lambda msg: None)
        if isinstance(objective, Preset):
            objective = DBAEObjective(objective, eval_set=self.dist.is_main and options.eval_images > 0)
        self.objective = objective
        cfg = self.loop = objective.loop
        _check_layout(cfg.batch_size, self.dist.world_size, options.grad_accum, options.keep_last)
        self.micro_batch = cfg.batch_size // (self.dist.world_size * options.grad_accum)
        self.keeper = (CheckpointKeeper(self.ckpt_dir, options.keep_last, self.log, check=objective.check)
                       if self.ckpt_dir is not None else None)  # fmt: skip
        self.amp_dtype = AMP_DTYPES.get(cfg.precision) if self.device.type == "cuda" else None
        if cfg.precision != "fp32" and self.amp_dtype is None:
            self.log(f"note: --precision {cfg.precision} is mixed precision on CUDA; on {self.device.type} this "
                     "run trains in fp32")

        self.model = objective.module.to(self.device)
        self.memory_format = torch.channels_last if options.channels_last else torch.preserve_format
        if options.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.params = objective.trainable()
        self.optimizer = objective.optimizer(self.params)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.step = 0
        self.loss_module: nn.Module = _LossModule(objective)
        self.ddp: nn.Module | None = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = self.loss_module = DistributedDataParallel(self.loss_module, device_ids=ids)

        self.dataset = objective.dataset
        if len(self.dataset) < 1:  # type: ignore[arg-type]
            raise all_ranks(DataError("the training data set is empty"))
        self.eval_images = None
        if self.dist.is_main and self.out is not None and options.eval_images > 0:
            self.eval_images = objective.eval_images(options.eval_images)

    # ----- set-up -----
    def _resume_point(self) -> Path | None:
        """Rank 0's choice of the checkpoint to start from (None: a new run)."""
        if self.options.resume_from is not None:
            return Path(self.options.resume_from)
        if self.keeper is None:
            return None
        if self.options.resume:
            path = self.keeper.resume_point()
            if path is None:
                self.log(f"no checkpoint in {self.ckpt_dir}: starting a new run")
            else:  # refuse another model here, once for all ranks
                self.objective.check_model(path)
            return path
        existing = self.keeper.existing()
        if existing:
            raise ConfigError(
                f"{self.out} already holds a run (checkpoint at step {existing[-1][0]}); "
                "pass --resume auto to continue it, or choose another --out"
            )
        return None

    def prepare_run_dir(self) -> None:
        decision: tuple[str, Any] = ("start", None)
        if self.dist.is_main:
            try:
                path = self._resume_point()
                decision = ("start", None if path is None else str(path))
            except (ConfigError, CheckpointError) as exc:
                decision = (type(exc).__name__, str(exc))
        kind, value = self.dist.broadcast_object(decision)  # every rank starts from the same point
        if kind != "start":
            raise all_ranks({"ConfigError": ConfigError, "CheckpointError": CheckpointError}[kind](value))
        if value is not None:
            self.restore(Path(value))
        if self.dist.is_main and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.objective.config_text is not None:
                atomic_write_text(self.out / "config.json", self.objective.config_text)

    def restore(self, path: Path) -> None:
        state = self.objective.resume_state(path)
        label = self.objective.label
        load_state_strict(self.model, state.model, label, path)
        load_state_strict(self.ema.module, state.ema, f"{label} EMA", path)
        if state.optim is not None:
            self.optimizer.load_state_dict(state.optim)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        if state.step > self.loop.steps:
            raise all_ranks(ConfigError(f"the checkpoint is at step {state.step}, past the preset's "
                                        f"{self.loop.steps} steps"))  # fmt: skip
        self.step = state.step
        self.log(f"resumed from {path} (step {self.step})")

    def _state(self) -> dict[str, Any]:
        return dict(
            model=self.model.state_dict(),
            ema=self.ema.state_dict(),
            optim=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
        )

    def save(self) -> Path | None:
        """Write the checkpoint of the current step (rank 0; every rank must call it, for
        the check that all ranks hold the same weights and EMA). None without ``out``."""
        if not self.dist.in_sync([self.model, self.ema.module]):
            self.log(f"warning: the ranks' weights drifted apart by step {self.step}; taking rank 0's")
            self.dist.broadcast_modules([self.model, self.ema.module])
        if self.keeper is None:
            return None
        path = self.ckpt_dir / checkpoint_name(self.step)
        if self.dist.is_main:
            self.keeper.save(self.step, self._writer())
        return path

    def _writer(self, extra: dict[str, str] | None = None) -> Callable[..., Path]:
        state = self._state()

        def write(path: Path, step: int, before_replace: Callable[[str], None], more: dict[str, str] | None = None
                  ) -> Path:  # fmt: skip
            return self.objective.save(path, step=step, extra=more, before_replace=before_replace, **state)

        return write

    # ----- one step -----
    def train_step(self, x_local: torch.Tensor, stop: bool = False) -> tuple[dict[str, torch.Tensor], bool]:
        """One optimisation step on this rank's share ``x_local`` of the global batch.

        ``stop``: this process was asked to stop; returns (logs averaged over the global
        batch, whether any rank was asked to stop), the same on every rank."""
        cfg = self.loop
        accum, micro, rank = self.options.grad_accum, self.micro_batch, self.dist.rank
        if x_local.shape[0] != accum * micro:
            raise ValueError(f"expected {accum * micro} images for this rank, got {x_local.shape[0]}")
        seed_step = self.step + cfg.first_seed_step
        generator = torch.Generator(self.device).manual_seed(step_seed(cfg.seed, seed_step))
        draws = self.objective.draw(cfg.batch_size, generator, self.device)
        forward = self.loss_module
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        nonfinite = torch.zeros((), device=self.device)
        for m in range(accum):
            chunk = rank * accum + m  # its place in the global batch
            start = chunk * micro
            part = draws.slice(start, start + micro)
            torch.manual_seed(_chunk_seed(cfg.seed, seed_step, chunk, 0))  # dropout and other global-RNG draws
            sync = self.ddp.no_sync() if self.ddp is not None and m < accum - 1 else nullcontext()
            autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                        else nullcontext())
            with sync:
                with autocast:
                    loss, logs = forward(x_local[m * micro : (m + 1) * micro], part,
                                         _chunk_seed(cfg.seed, seed_step, chunk, 2))
                self.scaler.scale(loss / accum if accum > 1 else loss).backward()
            nonfinite += (~torch.isfinite(loss.detach())).float()
            for k, v in logs.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
        # One collective per step: the logged terms, the divergence check and the stop flag.
        stats = torch.stack([*sums.values(), nonfinite, torch.tensor(float(stop), device=self.device)])
        stats = self.dist.all_reduce_sum(stats)
        parts = self.dist.world_size * accum
        logs = {k: stats[i] / parts for i, k in enumerate(sums)}
        nonfinite_count, stop_count = stats[-2:].tolist()  # the step's one wait for the device: both flags at once
        if nonfinite_count > 0:
            where = (f"The last good checkpoint in {self.ckpt_dir} is kept; " if self.ckpt_dir is not None else "")
            raise all_ranks(TrainingDiverged(
                f"the {self.objective.label} loss became {float(logs['loss'])} at step {self.step + 1}; stopped "
                f"without saving this step. {where}lower the learning rate or use fp32"
            ))
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        return {**logs, "grad_norm": grad_norm.detach()}, stop_count > 0

    # ----- evaluation -----
    def evaluate(self, module: nn.Module, grid_path: Path | None = None) -> dict[str, float]:
        return self.objective.evaluate(module, self.eval_images.to(self.device), grid_path, self.options.grid_zoom)

    # ----- the loop -----
    def _evaluate_and_keep_best(self, grid: Path, metrics: MetricsLog | None) -> dict[str, float]:
        """Rank 0: evaluate the EMA weights, log, and keep the state as the best checkpoint
        when its eval MSE is the lowest so far."""
        stats = self.evaluate(self.ema.module, grid)
        if metrics is not None:
            metrics.write({"step": self.step, **{f"eval_{k}": v for k, v in stats.items()}})
        if self.keeper.offer_best(self.step, stats["mse"], self._writer()):
            self.log(f"step {self.step}: best eval MSE so far ({stats['mse']:.5f}), kept as "
                     f"{self.ckpt_dir / 'best.safetensors'}")
        return stats

    def _loader(self) -> DataLoader:
        cfg = self.loop
        sampler = StepBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed, self.step, cfg.steps,
                                   rank=self.dist.rank, world_size=self.dist.world_size)
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            # workers keep PREFETCH_BATCHES batches each in flight ahead of the step that needs them
            prefetch_factor=PREFETCH_BATCHES if cfg.num_workers > 0 else None,
        )

    def fit(self) -> TrainResult:
        cfg = self.loop
        main = self.dist.is_main
        self.prepare_run_dir()
        evaluating = main and self.eval_images is not None
        samples = self.out / "samples" if self.out is not None else None
        eval_untrained = None
        if self.step == 0 and evaluating:
            eval_untrained = self.evaluate(self.model, samples / "step-00000000.png")
            atomic_write_text(self.out / "eval_untrained.json", json.dumps(eval_untrained, indent=2) + "\n")
        if self.options.compile:
            self.objective.compile()
        metrics = (MetricsLog(self.out / "metrics.jsonl", resume_step=self.step)
                   if main and self.out is not None else None)  # fmt: skip
        loader = self._loader()
        progress = None
        if self.options.progress and main:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.objective.label}", unit="step",
                            dynamic_ncols=True)
        stop = _StopRequest()
        stopping = False
        last_ckpt: Path | None = None
        world = self.dist.world_size
        window = LossWindow(self.device)
        began = time.perf_counter()
        window_start, window_images = time.perf_counter(), 0
        try:
            with stop.installed():
                for batch in loader:
                    x0 = _images(batch).to(self.device, non_blocking=True, memory_format=self.memory_format)
                    logs, stopping = self.train_step(x0, stop.requested)
                    stopping = stopping or (not self.dist.enabled and stop.requested)
                    window_images += cfg.batch_size  # the global batch: images of all ranks
                    window.add(logs["loss"])
                    if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                        window.close(self.step)
                        elapsed = time.perf_counter() - window_start
                        record = {k: float(v) for k, v in logs.items()}
                        total = window_images / max(elapsed, 1e-9)
                        record.update(step=self.step, images_per_s=total, images_per_s_per_device=total / world,
                                      world_size=world)
                        if metrics is not None:
                            metrics.write(record)
                        window_start, window_images = time.perf_counter(), 0
                        if progress is not None:
                            progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{total:.0f}",
                                                 img_s_dev=f"{total / world:.0f}")
                        else:  # no bar (--no-progress, batch jobs): one line per log step
                            self.log(f"step {self.step}/{cfg.steps}  loss {record['loss']:.4f}  {total:.1f} img/s "
                                     f"({total / world:.1f} per device, {world} device{'s' * (world > 1)})")
                    if progress is not None:
                        progress.update(1)
                    paused = time.perf_counter()  # evaluation and checkpoints do not count as training time
                    if (evaluating and cfg.sample_every is not None and self.step % cfg.sample_every == 0
                            and self.step < cfg.steps):
                        self._evaluate_and_keep_best(samples / f"step-{self.step:08d}.png", metrics)
                    if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stopping:
                        last_ckpt = self.save()
                    window_start += time.perf_counter() - paused
                    if stopping:
                        break
        finally:
            if progress is not None:
                progress.close()
            if metrics is not None:
                metrics.close()
        seconds = time.perf_counter() - began
        if stopping and self.step < cfg.steps:
            signum = stop.signal if stop.signal is not None else signal.SIGTERM  # another rank's signal
            return TrainResult(self.out, self.step, last_ckpt, None, eval_untrained, stopped_by=signum,
                               losses=window.means, seconds=seconds)
        if last_ckpt is None and self.ckpt_dir is not None:  # nothing left to train: the run was already complete
            last_ckpt = self.ckpt_dir / checkpoint_name(self.step)
            if not self.dist.broadcast_object(last_ckpt.exists()):
                last_ckpt = self.save()
        if window.means:
            self.log(f"{self.objective.label} trained to step {self.step} in {seconds:.1f} s; "
                     f"last loss {window.means[-1][1]:.4f}")
        final = None
        if evaluating:
            final = self._evaluate_and_keep_best(samples / "final.png", None)
            atomic_write_text(self.out / "eval.json", json.dumps({"step": self.step, **final}, indent=2) + "\n")
        self.dist.barrier()  # the job ends when rank 0 has written everything
        return TrainResult(self.out, self.step, last_ckpt, final, eval_untrained, losses=window.means, seconds=seconds)


def _images(batch: Any) -> torch.Tensor:
    """The images of a collated batch (a data set's items: images, or (image, ...) tuples)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise DataError("the training data must yield image tensors or (image, ...) tuples")
    return x.float()


def train(preset: Preset, options: TrainOptions) -> TrainResult:
    return Trainer(preset, options).fit()


def override(preset: Preset, **train_fields) -> Preset:
    """The preset with the given (non-None) training fields replaced."""
    fields = {k: v for k, v in train_fields.items() if v is not None}
    return replace(preset, train=replace(preset.train, **fields)) if fields else preset
