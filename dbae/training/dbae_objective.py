"""DBAE as an :class:`~dbae.training.objective.Objective` (SPEC 5, Algorithm 1): the
encoder, endpoint decoder and U-Net trained together by :meth:`DBAE.loss`, RAdam, the
``dbae-checkpoint/1`` format, and the periodic reconstruction grid of held-out images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..checkpoints import Checkpoint, load_checkpoint, read_metadata, save_checkpoint, verify_checkpoint
from ..config import Preset, dumps, preset_from_dict
from ..data import build_dataset
from ..errors import ConfigError
from ..imageio import save_grid
from ..metrics import summarize
from ..model import DBAE, TC_NEEDS_STOCHASTIC, LossNoise, fused_training
from .distributed import all_ranks
from .objective import LoopConfig


def check_same_model(stored: Preset, wanted: Preset, path: Path) -> None:
    if stored.model != wanted.model:
        raise ConfigError(
            f"{path} was trained with another model configuration (preset {stored.name!r}) than the one "
            f"asked for now (preset {wanted.name!r}); resume with the same preset, or choose another --out"
        )


class DBAEObjective:
    label = "DBAE"

    def __init__(self, preset: Preset, *, eval_set: bool = True) -> None:
        """``eval_set``: build the held-out split for the periodic evaluation (rank 0 only)."""
        cfg = preset.train
        if cfg.tc_weight > 0 and not preset.model.encoder.stochastic:
            raise all_ranks(ConfigError(TC_NEEDS_STOCHASTIC))
        self.preset = preset
        self.loop = LoopConfig(batch_size=cfg.batch_size, steps=cfg.steps, seed=cfg.seed, ema_decay=cfg.ema_decay,
                               grad_clip=cfg.grad_clip, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                               sample_every=cfg.sample_every, precision=cfg.precision, num_workers=cfg.num_workers)
        torch.manual_seed(cfg.seed)  # the initial weights are part of what the seed fixes
        self.module: DBAE = DBAE(preset.model)
        size = preset.model.image_size
        self.dataset = build_dataset(cfg.dataset, size, seed=cfg.seed, split="train")
        self.eval_set = build_dataset(cfg.dataset, size, seed=cfg.seed, split="test") if eval_set else None
        self.config_text = dumps(preset) + "\n"

    def trainable(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.preset.train
        return torch.optim.RAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> LossNoise:
        return self.module.draw_loss_noise(batch, generator=generator, device=device, eps=not fused_training(device))

    def loss(self, module: nn.Module, x: torch.Tensor, draws: LossNoise, noise_seed: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        out = module.loss(x, noise=draws, noise_seed=noise_seed, tc_weight=self.preset.train.tc_weight)
        return out.loss, out.logs

    # ----- checkpoints -----
    def save(self, path: Path, *, extra: dict[str, str] | None = None,
             before_replace: Callable[[str], None] | None = None, **state: Any) -> Path:  # fmt: skip
        return save_checkpoint(path, preset=self.preset, extra=extra, before_replace=before_replace, **state)

    def check(self, path: Path) -> None:
        verify_checkpoint(path)

    def check_model(self, path: Path) -> None:
        """Refuse another model from the header alone (before the file is read in full)."""
        check_same_model(preset_from_dict(json.loads(read_metadata(path)["preset"])), self.preset, path)

    def resume_state(self, path: Path) -> Checkpoint:
        ckpt = load_checkpoint(path)
        check_same_model(ckpt.preset, self.preset, path)
        return ckpt

    # ----- evaluation -----
    def eval_images(self, n: int) -> torch.Tensor | None:
        if self.eval_set is None:
            return None
        n = min(n, len(self.eval_set))
        return torch.stack([self.eval_set[i][0] for i in range(n)])

    @torch.no_grad()
    def evaluate(self, module: nn.Module, x: torch.Tensor, grid: Path | None, zoom: int | None) -> dict[str, float]:
        module.eval()
        rec = module.reconstruct(x, self.preset.train.sample_nfe)
        if grid is not None:
            n = min(8, x.shape[0])
            save_grid(grid, [x[:n], rec.x_T[:n], rec.images[:n]], ["input", "x_T", f"recon ({rec.nfe} NFE)"],
                      zoom=zoom)
        stats = summarize((rec.images.float().cpu() + 1) / 2, (x.float().cpu() + 1) / 2)
        return {**stats, "nfe": rec.nfe}

    def compile(self) -> None:
        for part in (self.module.encoder, self.module.decoder, self.module.unet):
            part.compile()
