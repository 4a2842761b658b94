"""The training loop of SPEC section 5 (Algorithm 1).

Exact resume: every random draw of step ``s`` (data order, t, eps, z noise, dropout) is
seeded from ``(seed, s)``, and a checkpoint stores the weights, EMA weights, optimizer and
loss-scaler state, so a run resumed from step ``s`` continues bit-for-bit like the
uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from ..config import Preset, dumps
from ..data import build_dataset
from ..errors import ConfigError, TrainingDiverged
from ..imageio import save_grid
from ..metrics import summarize
from ..model import DBAE, TC_NEEDS_STOCHASTIC
from .batches import StepBatchSampler, step_seed
from .checkpoint import (
    atomic_write_text,
    checkpoint_name,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_state_strict,
    save_checkpoint,
)
from .ema import EMA
from .metrics_log import MetricsLog

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainOptions:
    """Run-time options that are not part of the model/training configuration."""

    out: Path
    resume: bool = False
    compile: bool = False
    device: str = "auto"
    progress: bool = True
    keep_last: int = 3
    eval_images: int = 64
    log: Callable[[str], None] = print


@dataclass
class TrainResult:
    out: Path
    step: int
    checkpoint: Path
    eval: dict[str, float] | None  # None when the run was stopped early by a signal
    eval_untrained: dict[str, float] | None
    #: the signal (SIGTERM or SIGINT) that stopped the run before its last step, if any
    stopped_by: int | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but this PyTorch build sees no CUDA device")
    return device


def _check_same_model(stored: Preset, wanted: Preset, path: Path) -> None:
    if stored.model != wanted.model:
        raise ConfigError(
            f"{path} was trained with another model configuration (preset {stored.name!r}) than the one "
            f"asked for now (preset {wanted.name!r}); resume with the same preset, or choose another --out"
        )


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
    def __init__(self, preset: Preset, options: TrainOptions) -> None:
        self.preset = preset
        self.options = options
        self.out = Path(options.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = resolve_device(options.device)
        cfg = preset.train
        if cfg.tc_weight > 0 and not preset.model.encoder.stochastic:
            raise ConfigError(TC_NEEDS_STOCHASTIC)
        self.amp_dtype = AMP_DTYPES.get(cfg.precision) if self.device.type == "cuda" else None

        torch.manual_seed(cfg.seed)  # the initial weights are part of what the seed fixes
        self.model = DBAE(preset.model).to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.optimizer = torch.optim.RAdam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.step = 0

        size = preset.model.image_size
        self.dataset = build_dataset(cfg.dataset, size, seed=cfg.seed, split="train")
        self.eval_set = build_dataset(cfg.dataset, size, seed=cfg.seed, split="test")
        self.eval_images = self._eval_batch(options.eval_images)

    # ----- set-up -----
    def _eval_batch(self, n: int) -> torch.Tensor:
        n = min(n, len(self.eval_set))
        return torch.stack([self.eval_set[i][0] for i in range(n)])

    def prepare_run_dir(self) -> None:
        existing = list_checkpoints(self.ckpt_dir)
        if self.options.resume:
            path = latest_valid_checkpoint(self.ckpt_dir, warn=self.options.log)
            if path is None:
                self.options.log(f"no checkpoint in {self.ckpt_dir}: starting a new run")
            else:
                self.restore(path)
        elif existing:
            raise ConfigError(
                f"{self.out} already holds a run (checkpoint at step {existing[-1][0]}); "
                "pass --resume to continue it, or choose another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.json", dumps(self.preset) + "\n")

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        _check_same_model(ckpt.preset, self.preset, path)
        load_state_strict(self.model, ckpt.model, "model", path)
        load_state_strict(self.ema.module, ckpt.ema, "EMA", path)
        if ckpt.optim is not None:
            self.optimizer.load_state_dict(ckpt.optim)
        if ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        self.step = ckpt.step
        self.options.log(f"resumed from {path} (step {self.step})")

    def save(self) -> Path:
        path = self.ckpt_dir / checkpoint_name(self.step)
        save_checkpoint(
            path,
            preset=self.preset,
            step=self.step,
            model=self.model.state_dict(),
            ema=self.ema.state_dict(),
            optim=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
        )
        for _, old in list_checkpoints(self.ckpt_dir)[: -self.options.keep_last]:
            old.unlink(missing_ok=True)
        return path

    # ----- one step -----
    def train_step(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.preset.train
        seed = step_seed(cfg.seed, self.step)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global RNG
        generator = torch.Generator(self.device).manual_seed(seed)
        self.model.train()
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        with autocast:
            out = self.model.loss(x0, generator=generator, noise_seed=step_seed(cfg.seed, self.step, stream=2),
                                  tc_weight=cfg.tc_weight)
        loss = out.loss
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {float(loss.detach())} at step {self.step + 1}; stopped without saving this step. "
                f"The last good checkpoint in {self.ckpt_dir} is kept; lower the learning rate or use fp32"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        return {**out.logs, "grad_norm": grad_norm.detach()}

    # ----- evaluation -----
    @torch.no_grad()
    def evaluate(self, module: DBAE, grid_path: Path | None = None) -> dict[str, float]:
        module.eval()
        x = self.eval_images.to(self.device)
        rec = module.reconstruct(x, self.preset.train.sample_nfe)
        if grid_path is not None:
            n = min(8, x.shape[0])
            save_grid(grid_path, [x[:n], rec.x_T[:n], rec.images[:n]], ["input", "x_T", f"recon ({rec.nfe} NFE)"])
        stats = summarize((rec.images.float().cpu() + 1) / 2, (x.float().cpu() + 1) / 2)
        return {**stats, "nfe": rec.nfe}

    # ----- the loop -----
    def fit(self) -> TrainResult:
        cfg = self.preset.train
        self.prepare_run_dir()
        samples = self.out / "samples"
        eval_untrained = None
        if self.step == 0:
            eval_untrained = self.evaluate(self.model, samples / "step-00000000.png")
            atomic_write_text(self.out / "eval_untrained.json", json.dumps(eval_untrained, indent=2) + "\n")
        if self.options.compile:
            for part in (self.model.encoder, self.model.decoder, self.model.unet):
                part.compile()
        metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step)
        sampler = StepBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed, self.step, cfg.steps)
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        progress = None
        if self.options.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        stop = _StopRequest()
        last_ckpt: Path | None = None
        window_start, window_images = time.perf_counter(), 0
        try:
            with stop.installed():
                for x0, _ in loader:
                    x0 = x0.to(self.device, non_blocking=True)
                    logs = self.train_step(x0)
                    window_images += x0.shape[0]
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        elapsed = time.perf_counter() - window_start
                        record = {k: float(v) for k, v in logs.items()}
                        record.update(step=self.step, images_per_s=window_images / max(elapsed, 1e-9))
                        metrics.write(record)
                        window_start, window_images = time.perf_counter(), 0
                        if progress is not None:
                            progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                    if progress is not None:
                        progress.update(1)
                    if self.step % cfg.sample_every == 0 and self.step < cfg.steps:
                        stats = self.evaluate(self.ema.module, samples / f"step-{self.step:08d}.png")
                        metrics.write({"step": self.step, **{f"eval_{k}": v for k, v in stats.items()}})
                    if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop.requested:
                        last_ckpt = self.save()
                    if stop.requested:
                        break
        finally:
            if progress is not None:
                progress.close()
            metrics.close()
        if stop.requested and self.step < cfg.steps:
            return TrainResult(self.out, self.step, last_ckpt, None, eval_untrained, stopped_by=stop.signal)
        if last_ckpt is None:  # nothing left to train: the run was already complete
            last_ckpt = self.ckpt_dir / checkpoint_name(self.step)
            if not last_ckpt.exists():
                last_ckpt = self.save()
        final = self.evaluate(self.ema.module, samples / "final.png")
        atomic_write_text(self.out / "eval.json", json.dumps({"step": self.step, **final}, indent=2) + "\n")
        return TrainResult(self.out, self.step, last_ckpt, final, eval_untrained)


def train(preset: Preset, options: TrainOptions) -> TrainResult:
    return Trainer(preset, options).fit()


def override(preset: Preset, **train_fields) -> Preset:
    """The preset with the given (non-None) training fields replaced."""
    fields = {k: v for k, v in train_fields.items() if v is not None}
    return replace(preset, train=replace(preset.train, **fields)) if fields else preset
