"""``dbae train``: train a DBAE from a preset, with exact resume; one process, or one per
device under ``torchrun`` (see README, "Multi-GPU training"). ``--method diffae|pdae`` trains
a baseline from the same preset instead (:mod:`.train_baselines`)."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from ..baselines.runs import check_run_method
from ..config import PRESETS, get_preset
from ..errors import ConfigError, DBAEError
from ..training import TrainOptions, override, train
from ..training.distributed import all_ranks, env_rank, session
from . import train_baselines
from .common import add_image_limit_argument, add_zoom_argument, check_out_dir, check_zoom

HELP = "train a DBAE model (or, with --method, the DiffAE / PDAE baseline)"


def _resume_mode(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes 'auto' (or nothing), not {value!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=train_baselines.METHODS, default="dbae",
                   help="dbae (default), or a baseline on the same preset's backbone: diffae, pdae (both stages)")
    p.add_argument("--preset", default="shapes16", choices=sorted(PRESETS), help="model + training preset")
    p.add_argument("--out", type=Path, help="run directory (default runs/<preset>; baselines runs/<preset>-<method>)")
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--batch-size", type=int,
                   help="global batch per step, summed over all ranks and accumulation micro-batches")
    p.add_argument("--grad-accum", type=int,
                   help="micro-batches per rank and step (gradient accumulation; default 1): each rank "
                        "processes batch-size / (ranks x grad-accum) images at a time")
    p.add_argument("--lr", type=float)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="mixed precision on CUDA")
    p.add_argument("--seed", type=int)
    p.add_argument("--dataset", help="'shapes' (built-in), a folder or .zip of images, or an LMDB "
                                     "(see 'dbae data build-lmdb' and docs/datasets.md)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--sample-every", type=int, help="steps between reconstruction grids (and best-checkpoint checks)")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    p.add_argument("--keep-last", type=int,
                   help="periodic checkpoints kept (default 3); checkpoints/best.safetensors is kept apart")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    p.add_argument("--tc-weight", type=float,
                   help="weight of the total-correlation penalty on z (DBAE+TC; stochastic encoder only; default 0)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, type=_resume_mode, metavar="auto",
                   help="continue the run in --out from its newest intact checkpoint (start a new one if it has "
                        "none); '--resume' alone means the same")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--channels-last", action="store_true",
                   help="keep weights and batches channels-last (NHWC), cuDNN's fastest layout on tensor-core GPUs")
    p.add_argument("--device", default="auto",
                   help="auto, cpu or cuda[:N]; under torchrun auto, cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--eval-images", type=int, metavar="N",
                   help="held-out images of the reconstruction check after training (eval.json; default 64, "
                        "16 for the baselines; 0: no check)")
    add_zoom_argument(p, "the sample grids' images")
    add_image_limit_argument(p)
    train_baselines.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    rank = env_rank()
    try:
        return _run(args)
    except DBAEError as exc:
        if rank == 0:
            raise
        if getattr(exc, "all_ranks", False):
            return 2  # the same error on every rank: rank 0 reports it
        raise type(exc)(f"rank {rank}: {exc}") from None
    except Exception as exc:
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under torchrun: its failure summary names this error
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            handler = get_error_handler()
            handler.initialize()
            handler.record_exception(exc)
        raise


def _run(args: argparse.Namespace) -> int:
    if args.eval_images is not None and args.eval_images < 0:
        raise all_ranks(ConfigError(f"--eval-images must be >= 0 (0: no check after training), got {args.eval_images}"))
    if args.method != "dbae":
        return train_baselines.run(args)
    train_baselines.check_method_options(args)
    preset = override(
        get_preset(args.preset),
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
        precision=args.precision, seed=args.seed, dataset=args.dataset, log_every=args.log_every,
        sample_every=args.sample_every, ckpt_every=args.ckpt_every, num_workers=args.num_workers,
        tc_weight=args.tc_weight,
    )
    out = args.out or Path("runs") / preset.name
    try:
        check_zoom(args)
        check_out_dir(out)
        check_run_method(out, "dbae")
    except DBAEError as exc:
        raise all_ranks(exc) from None
    with session(args.device) as dist:
        result = train(
            preset,
            TrainOptions(out=out, resume=args.resume is not None, compile=args.compile, device=args.device,
                         channels_last=args.channels_last, grid_zoom=args.zoom,
                         progress=not args.no_progress, keep_last=3 if args.keep_last is None else args.keep_last,
                         grad_accum=1 if args.grad_accum is None else args.grad_accum, dist=dist,
                         **({} if args.eval_images is None else {"eval_images": args.eval_images})),
        )
    if dist is not None and not dist.is_main:
        return 0 if result.stopped_by is None else 128 + result.stopped_by
    if result.stopped_by is not None:
        name = signal.Signals(result.stopped_by).name
        print(f"stopped by {name} at step {result.step}; checkpoint {result.checkpoint}. "
              f"Continue with the same command plus --resume auto")
        return 128 + result.stopped_by
    before = result.eval_untrained
    world = "" if dist is None else f" on {dist.world_size} ranks"
    print(f"trained {preset.name} to step {result.step}{world}: checkpoint {result.checkpoint}")
    if before is not None:
        print(f"  untrained : MSE {before['mse']:.4f}  PSNR {before['psnr']:.2f} dB  SSIM {before['ssim']:.3f}")
    after = result.eval
    if after is None:  # --eval-images 0
        print(f"  metrics   : {out / 'metrics.jsonl'} (no check after training: --eval-images 0)")
        return 0
    print(f"  trained   : MSE {after['mse']:.4f}  PSNR {after['psnr']:.2f} dB  SSIM {after['ssim']:.3f}"
          f"  ({after['nfe']} NFE, EMA weights, held-out images)")
    print(f"  grid      : {out / 'samples' / 'final.png'}")
    print(f"  metrics   : {out / 'eval.json'}  {out / 'metrics.jsonl'}")
    return 0
