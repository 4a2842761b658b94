"""``dbae serve``: the real-time editing studio in the browser (see :mod:`dbae.serve`)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ..errors import ConfigError, DataError
from ..export.registry import KINDS
from ..export.runner import MAX_STEPS, MIN_STEPS
from ..sampling import SAMPLERS
from ..serve.studio import DEFAULT_MAX_UPLOAD_BYTES
from .common import add_checkpoint_arguments, add_image_limit_argument, open_model

HELP = "edit images in the browser in real time: a local web app over the deployment runners"

DEFAULT_MAX_UPLOAD_MB = DEFAULT_MAX_UPLOAD_BYTES / 1e6


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--runner", choices=["auto", *KINDS], default="auto",
                   help="runner of every encode and decode (default auto: on the CPU onnxruntime-step where onnx and "
                        "onnxruntime are installed, else eager; cuda-graph on a GPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="the runner's precision (default fp32 on the CPU, bf16 on CUDA)")
    p.add_argument("--steps", type=int, default=4,
                   help=f"default decode steps K ({MIN_STEPS}-{MAX_STEPS}; the page can change it; default 4)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler", help="default sampler (default euler)")
    p.add_argument("--classifier", type=Path,
                   help="attribute classifier of `dbae train-classifier`: one slider per attribute (without one, "
                        "a model of the built-in shapes gets one fitted at start-up)")
    p.add_argument("--no-auto-classifier", action="store_true",
                   help="do not fit a classifier at start-up when --classifier is not given")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"refuse uploaded files over this many MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    add_image_limit_argument(p)
    p.add_argument("--max-batch", type=int, default=16,
                   help="decode up to this many connections' requests in one runner call (default 16; 1: no batching)")
    p.add_argument("--threads", type=int,
                   help="torch's CPU threads per runner call on the CPU (default: half the cores, at least 1; "
                        "the rest serve the page)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning",
                   help="uvicorn's log level (default warning)")


def check_serve_dependencies() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "websockets") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"dbae serve needs {', '.join(missing)}: pip install 'dbae[serve]'")


def run(args: argparse.Namespace) -> int:
    check_serve_dependencies()
    if not (MIN_STEPS <= args.steps <= MAX_STEPS):
        raise DataError(f"--steps must be from {MIN_STEPS} to {MAX_STEPS}, got {args.steps}")
    if not (args.max_upload_mb > 0) or args.max_upload_mb == float("inf"):
        raise DataError(f"--max-upload-mb must be a positive number, got {args.max_upload_mb}")
    if args.max_batch < 1:
        raise DataError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.threads is not None and args.threads < 1:
        raise DataError(f"--threads must be at least 1, got {args.threads}")
    if not (0 <= args.port <= 65535):
        raise DataError(f"--port must be from 0 to 65535, got {args.port}")
    from ..apps.attributes import load_classifier
    from ..serve.server import bind, host_warning, make_studio, run_server, url_of

    if args.classifier is not None:
        load_classifier(args.classifier)  # a missing or broken file fails before the model loads
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    loaded = open_model(args)
    print(f"model: {loaded.path} (preset {loaded.preset.name}, step {loaded.step})", flush=True)
    studio = make_studio(
        loaded, ckpt=str(args.ckpt), ema=not args.raw_weights, runner=args.runner, precision=args.precision,
        steps=args.steps, sampler=args.sampler, classifier=args.classifier, auto=not args.no_auto_classifier,
        max_batch=args.max_batch, max_upload_bytes=max(1, round(args.max_upload_mb * 1e6)), threads=args.threads,
        log=lambda line: print(line, flush=True),
    )
    sock = bind(args.host, args.port)
    print(f"dbae serve: open {url_of(sock, args.host)} (Ctrl-C stops)", flush=True)
    try:
        run_server(studio, sock, log_level=args.log_level)
    finally:
        sock.close()
    return 0
