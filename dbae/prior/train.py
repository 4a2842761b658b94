"""Training the latent prior (SPEC 7, the paper's Algorithm 3).

The autoencoder is frozen: the prior only sees the stored latents of a
:class:`~dbae.prior.latents.LatentSet`, normalized per dimension by the set's mean/std.
Each step draws a batch of latents (with replacement), t and eps from a generator seeded
by ``(seed, step)``, so a run is reproducible; AdamW with a constant learning rate,
gradient clipping and an EMA copy of the weights. The checkpoint (``<out>/prior.safetensors``
+ ``prior.json``, :mod:`.checkpoint`) is rewritten atomically every ``ckpt_every`` steps and
at the end; the loss is logged to ``<out>/metrics.jsonl``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, TrainingDiverged
from ..training.batches import step_seed
from ..training.ema import EMA
from ..training.metrics_log import LossWindow, MetricsLog
from .checkpoint import FILE_NAME, save_prior
from .config import PriorPreset
from .ddim import LatentDiffusion
from .latents import LatentSet
from .network import MLPSkipNet


@dataclass
class PriorTrainResult:
    """``path``: the prior checkpoint; ``losses``: (step, mean loss over the log window)
    pairs, in order; ``seconds``: wall time of the loop."""

    path: Path
    step: int
    losses: list[tuple[int, float]]
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1]


def train_prior(
    latents: LatentSet,
    preset: PriorPreset,
    out: Path,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> PriorTrainResult:
    """Train a prior on ``latents`` and write it to ``out`` (a directory)."""
    out = Path(out)
    target = out / FILE_NAME
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; choose another --out or pass --force to replace it")
    cfg = preset.train
    device = torch.device(device)
    data = latents.normalize(latents.z).to(device)
    if data.shape[0] < 2:
        raise ConfigError("the latent set holds fewer than 2 latents; infer more with `dbae infer-latents --n`")

    torch.manual_seed(cfg.seed)  # the initial weights are part of what the seed fixes
    net = MLPSkipNet(preset.net, latents.z_dim).to(device)
    ema = EMA(net, cfg.ema_decay)
    diffusion = LatentDiffusion(preset.diffusion)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autoencoder = latents.info.autoencoder
    latents_record = {**latents.info.to_dict(), "z_dim": latents.z_dim}
    del latents_record["autoencoder"]

    def save(step: int, losses: list[tuple[int, float]]) -> Path:
        extra = {"last_loss": losses[-1][1] if losses else None, "latents_seen": step * cfg.batch_size}
        return save_prior(target, preset=preset, step=step, model=net.state_dict(), ema=ema.state_dict(),
                          mean=latents.mean, std=latents.std, autoencoder=autoencoder,
                          latents=latents_record, extra=extra)

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a replaced prior starts a fresh log
    metrics = MetricsLog(out / "metrics.jsonl")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="train prior", unit="step", dynamic_ncols=True)
    window = LossWindow(device)
    start = time.perf_counter()
    net.train()
    try:
        for step in range(1, cfg.steps + 1):
            seed = step_seed(cfg.seed, step)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator(device).manual_seed(seed)
            idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=generator, device=device)
            loss = diffusion.loss(net, data[idx], generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            optimizer.step()
            ema.update(net)
            window.add(loss)
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = window.close(step)
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(f"the prior loss became {mean_loss} by step {step}; lower the learning rate")
                metrics.write({"step": step, "loss": mean_loss})
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
            if bar is not None:
                bar.update(1)
            if step % cfg.ckpt_every == 0 and step < cfg.steps:
                save(step, window.means)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    path = save(cfg.steps, window.means)
    seconds = time.perf_counter() - start
    log(f"prior trained for {cfg.steps} steps in {seconds:.1f} s; last loss {window.means[-1][1]:.4f}: {path}")
    return PriorTrainResult(path, cfg.steps, window.means, seconds)
