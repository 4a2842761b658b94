"""``dbae train``: train a DBAE from a preset, with exact resume."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from ..config import PRESETS, get_preset
from ..training import TrainOptions, override, train

HELP = "train a DBAE model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="shapes16", choices=sorted(PRESETS), help="model + training preset")
    p.add_argument("--out", type=Path, help="run directory (default runs/<preset>)")
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="mixed precision on CUDA")
    p.add_argument("--seed", type=int)
    p.add_argument("--dataset", help="'shapes' (built-in) or a folder of images")
    p.add_argument("--log-every", type=int)
    p.add_argument("--sample-every", type=int, help="steps between reconstruction grids")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    p.add_argument("--tc-weight", type=float,
                   help="weight of the total-correlation penalty on z (DBAE+TC; stochastic encoder only; default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    preset = override(
        get_preset(args.preset),
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
        precision=args.precision, seed=args.seed, dataset=args.dataset, log_every=args.log_every,
        sample_every=args.sample_every, ckpt_every=args.ckpt_every, num_workers=args.num_workers,
        tc_weight=args.tc_weight,
    )
    out = args.out or Path("runs") / preset.name
    result = train(
        preset,
        TrainOptions(out=out, resume=args.resume, compile=args.compile, device=args.device,
                     progress=not args.no_progress),
    )
    if result.stopped_by is not None:
        name = signal.Signals(result.stopped_by).name
        print(f"stopped by {name} at step {result.step}; checkpoint {result.checkpoint}. "
              f"Continue with the same command plus --resume")
        return 128 + result.stopped_by
    before = result.eval_untrained
    print(f"trained {preset.name} to step {result.step}: checkpoint {result.checkpoint}")
    if before is not None:
        print(f"  untrained : MSE {before['mse']:.4f}  PSNR {before['psnr']:.2f} dB  SSIM {before['ssim']:.3f}")
    after = result.eval
    print(f"  trained   : MSE {after['mse']:.4f}  PSNR {after['psnr']:.2f} dB  SSIM {after['ssim']:.3f}"
          f"  ({after['nfe']} NFE, EMA weights, held-out images)")
    print(f"  grid      : {out / 'samples' / 'final.png'}")
    print(f"  metrics   : {out / 'eval.json'}  {out / 'metrics.jsonl'}")
    return 0
