"""Making a studio from a checkpoint, and running it on uvicorn (``dbae serve``)."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from pathlib import Path
from typing import Callable

import torch

from ..apps.attributes import AttributeClassifier, encode_shapes, fit_classifier, load_classifier, shapes_labels
from ..errors import ConfigError
from ..export.runner import DecodeSetting
from ..inference import LoadedModel
from ..prior.identity import AutoencoderRef
from .render import Renderer, resolve_runner_kind
from .studio import DEFAULT_MAX_UPLOAD_BYTES, Studio

#: shapes images the automatic classifier is fitted on (and held out to score it)
AUTO_CLASSIFIER_TRAIN, AUTO_CLASSIFIER_VAL = 500, 100


def auto_classifier(loaded: LoadedModel, n: int = AUTO_CLASSIFIER_TRAIN, n_val: int = AUTO_CLASSIFIER_VAL) -> AttributeClassifier:
    """What ``dbae train-classifier --dataset shapes`` fits, on fewer images (seconds on a CPU):
    every shapes attribute, on the model's normalized z. Kept in memory only."""
    z, factors = encode_shapes(loaded.model, n, 0, "train")
    z_val, factors_val = encode_shapes(loaded.model, n_val, 0, "test")
    clf = fit_classifier(z, shapes_labels(factors), z_val=z_val, labels_val=shapes_labels(factors_val))
    clf.source = {"checkpoint": str(loaded.path), "step": loaded.step, "data": "shapes", "train_images": n,
                  "val_images": n_val, "made_by": "dbae serve (not saved)"}  # fmt: skip
    return clf


def default_cpu_threads() -> int:
    """Half the cores (at least one) for the runner calls on the CPU: the event loop, the
    PNG encoding and a browser on the same machine need the rest. (On the 2-core machine
    torch's default of 2 threads made a one-client drag's p50 slider-to-frame latency
    three times longer, 76 against 26 ms: docs/benchmarks.md.)"""
    return max(1, (os.cpu_count() or 2) // 2)


def how_to_make_a_classifier(ckpt: str) -> str:
    return (f"no --classifier: make one with `dbae train-classifier --ckpt {ckpt} --dataset shapes --out "
            "classifier.safetensors` (built-in shapes) or `--attr-file list_attr_celeba.txt --image-dir DIR` "
            "(CelebA's 40 attributes), then start `dbae serve` with --classifier classifier.safetensors")  # fmt: skip


def make_studio(
    loaded: LoadedModel,
    *,
    ckpt: str,
    ema: bool = True,
    runner: str = "auto",
    precision: str | None = None,
    steps: int = 4,
    sampler: str = "euler",
    classifier: Path | None = None,
    auto: bool = True,
    max_batch: int = 16,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> Studio:
    """The studio of a loaded model. ``classifier``: a file of ``dbae train-classifier``
    (checked against the model); without one, a model trained on the built-in shapes gets
    an automatic one (``auto``), any other model no sliders and the page says how to make them.
    ``threads``: torch's CPU threads for the runner calls on the CPU (default
    :func:`default_cpu_threads`)."""
    model = loaded.model
    device = next(model.parameters()).device
    setting = DecodeSetting(steps, sampler)
    clf, note = None, ""
    if classifier is not None:
        clf = load_classifier(classifier)
        ref = AutoencoderRef.of(loaded.path, ema=ema, step=loaded.step, preset=loaded.preset.name,
                                z_dim=model.config.z_dim)  # fmt: skip
        clf.check_model(model, ref, classifier)
        note = f"attributes of {classifier.name}"
    elif auto and loaded.preset.train.dataset == "shapes":
        t0 = time.perf_counter()
        clf = auto_classifier(loaded)
        note = (f"attributes of a classifier that dbae serve fitted on {AUTO_CLASSIFIER_TRAIN} shapes images "
                f"when it started (not saved); for a lasting one: dbae train-classifier --ckpt {ckpt} --dataset shapes")  # fmt: skip
        log(f"no --classifier: fitted one on the built-in shapes' factors ({AUTO_CLASSIFIER_TRAIN} images, "
            f"{len(clf.names)} attributes) in {time.perf_counter() - t0:.1f} s; it is not saved. "
            f"To keep one: dbae train-classifier --ckpt {ckpt} --dataset shapes --out classifier.safetensors")  # fmt: skip
    else:
        note = how_to_make_a_classifier(ckpt)
        log(note)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    kind = resolve_runner_kind(runner, device, precision)
    threads_note = ""
    if device.type == "cpu":  # after fitting the classifier (with every core)
        torch.set_num_threads(threads or default_cpu_threads())
        n = torch.get_num_threads()
        threads_note = f", {n} CPU thread{'s' if n > 1 else ''} per call"
    renderer = Renderer(model, kind, precision, setting, max_batch=max_batch, weights_id=loaded.weights_id)
    t0 = time.perf_counter()
    with torch.no_grad():  # build the default runner and warm it up (first calls allocate)
        r = renderer.runner(setting)
        size = model.config.image_size
        x = torch.zeros(1, model.config.image_channels, size, size)
        z = r.encode(x)
        r.decode(z)
    log(f"runner {r.name} ({precision}, {setting.sampler} x{setting.steps}) on {r.device}{threads_note}, ready in "
        f"{time.perf_counter() - t0:.1f} s; batching up to {max_batch} rows per call"
        + (" (off)" if max_batch == 1 else ""))  # fmt: skip
    return Studio(loaded, renderer, clf, classifier_note=note, max_upload_bytes=max_upload_bytes,
                  max_pixels=max_pixels)  # fmt: skip


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> str | None:
    """The warning printed when the server listens beyond this machine."""
    if is_loopback(host):
        return None
    where = "every network interface" if host in ("0.0.0.0", "::", "") else host  # "": all of them, as 0.0.0.0
    return (f"WARNING: listening on {where}: anyone who can reach this machine can use the studio and its "
            "model (there is no authentication); use --host 127.0.0.1 unless you mean it")  # fmt: skip


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: any free port), so the printed URL has the real port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


#: seconds an idle keep-alive connection is kept after a response (uvicorn's ``timeout_keep_alive``)
KEEP_ALIVE_S = 5
#: websocket keepalive: a ping every PING_INTERVAL_S, the connection dropped when its pong has not
#: come PING_TIMEOUT_S later (also a client that floods and never reads: see dbae.serve.transport)
PING_INTERVAL_S, PING_TIMEOUT_S = 20.0, 20.0


def server_config(studio: Studio, sock: socket.socket, *, log_level: str = "warning", ws_max_size: int | None = None,
                  header_timeout: float | None = None, keep_alive: int = KEEP_ALIVE_S,
                  ping_interval: float = PING_INTERVAL_S, ping_timeout: float = PING_TIMEOUT_S):  # fmt: skip
    """uvicorn's configuration of ``studio`` on the listening ``sock``: h11 with a request-head
    timeout and the websockets sans-I/O protocol with flow control (:mod:`.transport`), the
    keep-alive and keepalive-ping timeouts, the largest websocket message."""
    import uvicorn

    from .app import create_app
    from .transport import HEADER_TIMEOUT_S, FlowControlledWebSocket, HeaderTimeoutH11

    limit = ws_max_size or 2 * studio.max_upload_bytes + 64 * 1024  # beyond twice the limit: closed by uvicorn
    app = create_app(studio, loopback_only=is_loopback(sock.getsockname()[0]))
    http = HeaderTimeoutH11.with_timeout(HEADER_TIMEOUT_S if header_timeout is None else header_timeout)
    return uvicorn.Config(app, log_level=log_level, ws_max_size=limit, lifespan="on", access_log=False,
                          ws_per_message_deflate=False, http=http, ws=FlowControlledWebSocket,
                          timeout_keep_alive=keep_alive, ws_ping_interval=ping_interval,
                          ws_ping_timeout=ping_timeout)  # fmt: skip


def run_server(studio: Studio, sock: socket.socket, *, log_level: str = "warning", ws_max_size: int | None = None) -> None:
    """Serve ``studio`` on the listening ``sock`` until interrupted (one process, one worker)."""
    import uvicorn

    server = uvicorn.Server(server_config(studio, sock, log_level=log_level, ws_max_size=ws_max_size))
    try:
        server.run(sockets=[sock])
    finally:
        studio.renderer.close()
