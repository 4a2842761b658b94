"""ONNX Runtime step runner: one exported U-Net graph, driven by the project's own sampler.

The unrolled runner (:mod:`.onnxruntime_runner`) bakes one decode setting into each graph,
so every new steps / sampler setting costs an export (1-8 s). This runner exports three graphs
once per model and precision: the encoder, the endpoint decoder Dec(z) and the score U-Net
alone (:class:`.onnx_graphs.NetworkGraph`: ``(c_in x_t, c_noise, x_T, z) -> F``, dynamic
batch). A decode is :meth:`dbae.model.DBAE.decode` itself, the code path of the eager runner,
on a view of the model whose decoder and U-Net are those ONNX Runtime sessions: the
preconditioning scalars in float64 on the host, the fused C++ sampler steps where built (the
reference sampler otherwise), so Euler and Heun at every K (1-10) come from one export.

The graphs are cached in ``$DBAE_CACHE_DIR/onnx/<sha256>/step-<precision>/`` (default
``~/.cache/dbae/onnx``), where ``<sha256>`` is the digest of the model's configuration and of
the weights it runs (:func:`model_sha256`: a checkpoint's EMA and raw weights are two models).
Given the ``weights_id`` of a loaded checkpoint (:attr:`dbae.inference.LoadedModel.weights_id`:
the sha256 of its tensor data, checked when it was read, and which weights), the weights are
not hashed again (one pass over them, about a second for a real-size model).
A cache folder is an ordinary export folder (``manifest.json`` with the sha256 of each graph),
written atomically by :func:`dbae.export.onnx_export.export_onnx`; on start-up it is checked
(every file against its sha256, the configuration against the model) and exported again if
it is missing, incomplete or damaged. Concurrent start-ups take a file lock, so one exports
and the other reuses. If the cache folder cannot be written, the graphs go to a temporary
folder for this process only, removed when it exits (and a warning says so).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dbae.bridge import Preconditioning, VPBridge
from dbae.checkpoints.integrity import tensors_sha256
from dbae.config import dumps
from dbae.errors import ConfigError
from dbae.model import DBAE
from dbae.sampling import BridgeSampler

from .manifest import GraphInfo, Manifest, read_manifest
from .onnxruntime_runner import check_precision, require_onnxruntime, session_options
from .runner import DecodeSetting, PausingNetwork, Runner

Tensor = torch.Tensor

#: the graphs of a step export
STEP_KINDS = ("encoder", "endpoint", "network")
#: bumped when what a cache folder holds changes (older folders are then exported again)
CACHE_VERSION = 1


def dbae_cache_dir() -> Path:
    """``$DBAE_CACHE_DIR``, default ``~/.cache/dbae``."""
    return Path(os.environ.get("DBAE_CACHE_DIR") or Path.home() / ".cache" / "dbae")


def model_sha256(model: DBAE, weights_id: str | None = None) -> str:
    """sha256 of the model's configuration and of the weights it runs: of its state dict, or
    ``weights_id`` where given (see the module docstring)."""
    h = hashlib.sha256(f"dbae-onnx-step/{CACHE_VERSION}\0{dumps(model.config)}\0".encode())
    h.update(f"checkpoint\0{weights_id}".encode() if weights_id else tensors_sha256(model.state_dict()).encode())
    return h.hexdigest()


def step_cache_folder(model: DBAE, precision: str, cache_dir: Path | None = None, weights_id: str | None = None) -> Path:
    """Where the step export of ``model`` at ``precision`` is cached."""
    root = (cache_dir or dbae_cache_dir()) / "onnx"
    return root / model_sha256(model, weights_id) / f"step-{precision}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created) while inside; no lock where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent start-ups may both export (each publishes atomically)
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _usable(folder: Path, model: DBAE, precision: str) -> tuple[Manifest | None, str]:
    """(the manifest, "") when ``folder`` holds a sound step export of ``model``; else (None, why not)."""
    if not folder.exists():
        return None, "no cached export"
    try:
        manifest = read_manifest(folder)  # every graph file against its sha256
        manifest.check_config(model.config)
        for kind in STEP_KINDS:
            manifest.graph(kind, precision)
    except ConfigError as exc:
        return None, str(exc)
    return manifest, ""


def _export(model: DBAE, folder: Path, precision: str) -> Manifest:
    from .onnx_export import export_onnx

    return export_onnx(model, folder, settings=[], precisions=[precision], kinds=STEP_KINDS, overwrite=True)


def ensure_step_export(
    model: DBAE, precision: str = "fp32", *, cache_dir: Path | None = None, log: Callable[[str], None] | None = None,
    weights_id: str | None = None,
) -> tuple[Path, Manifest, bool]:  # fmt: skip
    """(folder, manifest, exported): the cached step export of ``model``, exported first
    (``exported`` True) when the cache has none or a damaged one."""
    from .onnx_export import require_onnx

    require_onnx()
    check_precision(precision)
    folder = step_cache_folder(model, precision, cache_dir, weights_id)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        tmp = Path(tempfile.mkdtemp(prefix="dbae-onnx-step-")) / folder.name
        atexit.register(shutil.rmtree, tmp.parent, ignore_errors=True)  # this process's only
        print(f"warning: cannot write the ONNX cache {folder.parent} ({exc.strerror}); exporting into {tmp.parent} "
              "for this process only (set DBAE_CACHE_DIR to a writable folder to keep it)", file=sys.stderr)  # fmt: skip
        return tmp, _export(model, tmp, precision), True
    with _locked(folder.parent / f"{folder.name}.lock"):
        manifest, why = _usable(folder, model, precision)
        if manifest is not None:
            return folder, manifest, False
        if log is not None:
            log(f"exporting the ONNX step graphs ({precision}) to {folder} ({why})")
        return folder, _export(model, folder, precision), True


class _Graph:
    """One graph's ONNX Runtime session, fed NumPy views of contiguous float32 CPU tensors."""

    def __init__(self, ort: Any, path: Path, info: GraphInfo, options: Any) -> None:
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.inputs, self.output = info.input_names, info.output_names[0]

    def __call__(self, *xs: Tensor) -> Tensor:
        feed = {name: x.detach().float().contiguous().numpy() for name, x in zip(self.inputs, xs)}
        (out,) = self.session.run([self.output], feed)
        return torch.from_numpy(out)


class _GraphModule(nn.Module):
    """A graph in the place of one of the model's networks (no parameters of its own)."""

    def __init__(self, graph: _Graph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, *xs: Tensor) -> Tensor:
        return self.graph(*xs)


class _RememberingBridge(VPBridge):
    """A bridge whose preconditioning at a time given as a Python float (how the samplers
    ask, twice per evaluation) is computed once, by :meth:`VPBridge.preconditioning` itself,
    and remembered: the same float64 values, without the ~0.2 ms of host-side float64 tensor
    work per call (8 ms of a 10-step decode of shapes16). The grid times of every decode
    setting number a few hundred at most."""

    def __init__(self, bridge: VPBridge) -> None:
        super().__init__(bridge.config)
        self._at: dict[float, Preconditioning] = {}

    def preconditioning(self, t: float | Tensor) -> Preconditioning:
        if isinstance(t, Tensor):
            return super().preconditioning(t)
        found = self._at.get(t)
        if found is None:
            found = self._at[t] = super().preconditioning(t)
        return found


class StepGraphs:
    """The three sessions of a step export, and the view of ``model`` that decodes with them.

    ``model`` gives the configuration, the sampling bridge and the sampler (its networks are
    replaced in the view, the model itself is left as it was); ``threads`` is ONNX Runtime's
    intra-op thread count (None: its default). The view's sampling bridge remembers the
    preconditioning of each grid time (:class:`_RememberingBridge`)."""

    def __init__(self, model: DBAE, folder: Path, manifest: Manifest, precision: str, *,
                 threads: int | None = None) -> None:  # fmt: skip
        ort = require_onnxruntime()
        options = session_options(ort, threads)
        graphs = {kind: _Graph(ort, folder / manifest.graph(kind, precision).file, manifest.graph(kind, precision), options)
                  for kind in STEP_KINDS}  # fmt: skip
        self.encoder = graphs["encoder"]
        self.precision, self.folder = precision, folder
        cfg = model.config
        self.image_shape, self.z_dim = (cfg.image_channels, cfg.image_size, cfg.image_size), cfg.z_dim
        view = copy.copy(model)
        view._modules = dict(model._modules)  # copy.copy would share the dict of submodules
        view.encoder = None  # encodes run the encoder graph (the mean), never the torch encoder
        view.decoder = _GraphModule(graphs["endpoint"])
        view.unet = PausingNetwork(_GraphModule(graphs["network"]))  # (see dbae.serve.render)
        view.sampling_bridge = _RememberingBridge(model.sampling_bridge)
        view.sampler = BridgeSampler(view.sampling_bridge)
        self.model = view.eval()


class OnnxStepRunner(Runner):
    """Encode with the encoder graph; decode with :meth:`DBAE.decode` on the ONNX Runtime
    endpoint and U-Net graphs (see the module docstring), at ``setting``."""

    name = "onnxruntime-step"
    preemptible = True

    def __init__(self, graphs: StepGraphs, setting: DecodeSetting) -> None:
        super().__init__(graphs.image_shape, graphs.z_dim, setting, "cpu")
        self.graphs = graphs
        self.precision = graphs.precision

    @torch.no_grad()
    def _encode(self, images: Tensor) -> Tensor:
        return self.graphs.encoder(images)

    @torch.no_grad()
    def _decode(self, z: Tensor) -> Tensor:
        s = self.setting
        return self.graphs.model.decode(z, s.nfe, sampler=s.sampler).images.float()


def step_factory(
    model: DBAE, precision: str = "fp32", *, cache_dir: Path | None = None, threads: int | None = None,
    log: Callable[[str], None] | None = None, weights_id: str | None = None,
) -> Callable[[DecodeSetting], OnnxStepRunner]:  # fmt: skip
    """Export (or reuse the cached export) now, open the sessions once, and return the
    factory of runners for any decode setting, all sharing those sessions (``weights_id``:
    see the module docstring)."""
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError("runner onnxruntime-step runs on the CPU (pass --device cpu, or use cuda-graph on a GPU)")
    require_onnxruntime()
    folder, manifest, _ = ensure_step_export(model, precision, cache_dir=cache_dir, log=log, weights_id=weights_id)
    graphs = StepGraphs(model, folder, manifest, precision, threads=threads)
    return lambda setting: OnnxStepRunner(graphs, setting)
