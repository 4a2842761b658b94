"""``dbae export``: ONNX graphs (and optionally TensorRT engines) of a checkpoint's model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..sampling import SAMPLERS
from .common import apply_sampling_options, check_out_dir

HELP = "export a checkpoint to ONNX (encoder, decoder, denoiser, unrolled K-step decode) or TensorRT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint file, or a run directory (its newest checkpoint)")
    p.add_argument("--raw-weights", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--out", type=Path, required=True, help="output folder (graphs and manifest.json)")
    p.add_argument("--steps", nargs="+", type=int, default=[10],
                   help="decode steps K of the unrolled decode graphs, 1..10, one graph each (default 10)")  # fmt: skip
    p.add_argument("--sampler", choices=SAMPLERS, default="euler", help="sampler of the decode graphs (default euler)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "fp16", "bf16"], default=["fp32", "fp16"],
                   help="graph precisions (default fp32 fp16); fp16 and bf16 run the networks in float16 / "
                        "bfloat16 with float32 inputs and outputs; bf16 graphs (opset 22) run in TensorRT, "
                        "not in ONNX Runtime")  # fmt: skip
    p.add_argument("--format", choices=["onnx", "trt"], default="onnx",
                   help="onnx (default), or trt: the ONNX export plus TensorRT engines of the encoder and decode "
                        "graphs at each --precision (needs tensorrt and a CUDA GPU)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=64, help="TensorRT: largest batch of the engines (default 64)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 17, the least supported; 22 when --precision includes bf16)")  # fmt: skip
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx.export's TorchScript tracer (default, fast) or its torch.export-based "
                        "dynamo exporter (tens of times slower on the unrolled decode)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder once the new export is done")
    p.add_argument("--sampling-sigma-T", type=float, default=None, metavar="S",
                   help="sigma_T of the preconditioning in the graphs (default: the trained one; the authors' "
                        "released scripts sample with 0)")


def run(args: argparse.Namespace) -> int:
    from ..export.onnx_export import checkpoint_info, export_onnx, require_onnx
    from ..export.runner import DecodeSetting
    from ..checkpoints import resolve_checkpoint
    from ..inference import load_model

    check_out_dir(args.out)
    settings = [DecodeSetting(k, args.sampler) for k in dict.fromkeys(args.steps)]  # ConfigError for K outside 1..10
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    precisions = list(dict.fromkeys(args.precision))
    require_onnx()
    if args.format == "trt":
        from ..export.tensorrt_runner import require_tensorrt

        require_tensorrt()  # before any work: one line saying what to install
    path = resolve_checkpoint(args.ckpt)
    loaded = load_model(path, ema=not args.raw_weights, device="cpu")
    apply_sampling_options(args, loaded.model)
    info = checkpoint_info(loaded.path, loaded.step, ema=not args.raw_weights)
    manifest = export_onnx(
        loaded.model, args.out, settings=settings, precisions=precisions,
        preset=loaded.preset.name, checkpoint=info, opset=args.opset, exporter=args.exporter, overwrite=args.force,
        log=lambda msg: print(msg, flush=True),
    )  # fmt: skip
    count = sum(len(graphs) for graphs in manifest.graphs.values())
    print(f"wrote {count} ONNX graphs of {loaded.preset.name} (step {loaded.step}, "
          f"{'raw' if args.raw_weights else 'EMA'} weights) and manifest.json to {args.out}")  # fmt: skip
    if args.format == "trt":
        from ..export.tensorrt_runner import build_export_engines

        engines = build_export_engines(args.out, precisions, max_batch=args.max_batch,
                                       log=lambda msg: print(msg, flush=True))  # fmt: skip
        print(f"wrote {len(engines)} TensorRT engines to {args.out / 'tensorrt'}")
    return 0
