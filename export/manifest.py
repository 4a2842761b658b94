"""The manifest of an ONNX export folder (``manifest.json``): what each graph file holds.

An export folder holds, per precision (``fp32``, ``fp16``, ``bf16``), the graphs

    encoder.<precision>.onnx                  images (B, C, H, W) -> z (B, z_dim), the encoder mean
    endpoint.<precision>.onnx                 z -> x_T = Dec(z)
    denoiser.<precision>.onnx                 (x_t, t, x_T, z) -> D, one network evaluation
    network.<precision>.onnx                  (c_in x_t, c_noise, x_T, z) -> F, the U-Net alone
    decode-<sampler>-k<K>.<precision>.onnx    z -> images, Dec(z) then K unrolled sampler steps

and ``manifest.json``, written last: a folder without a readable manifest is no export.
The manifest names every graph's inputs and outputs (name, shape with ``"batch"`` for the
dynamic axis, dtype), its NFE, the sha256 of its file, and the export's provenance: preset
and model configuration, checkpoint (path, sha256, step, weights), opset, exporter, torch
and onnx versions. :func:`read_manifest` checks all of that before a runtime uses a graph.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dbae.config import ModelConfig, dumps, model_config_from_dict
from dbae.errors import ConfigError

FORMAT = "dbae-onnx-export/1"
MANIFEST_NAME = "manifest.json"
#: precisions the exporter writes; fp16 and bf16 run the networks in that type with float32 inputs/outputs
PRECISIONS = ("fp32", "fp16", "bf16")
#: the first ONNX opset whose convolutions take bfloat16 (opset 22); ONNX Runtime's CPU provider has none
BF16_MIN_OPSET = 22
PRECISION_NOTE = (
    "fp32: everything in float32. fp16: network weights and activations in float16; graph inputs and "
    "outputs stay float32 and the sampler state, drift and preconditioning stay float32 (float64 for the "
    "denoiser graph's preconditioning from t). bf16: as fp16 in bfloat16 (opset 22 or later; for TensorRT, "
    "which builds its engines strongly typed from these graphs)."
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def graph_key(kind: str, steps: int | None = None, sampler: str | None = None) -> str:
    """Manifest key of a graph: ``encoder``, ``endpoint``, ``denoiser`` or ``decode-<sampler>-k<K>``."""
    return f"decode-{sampler}-k{steps}" if kind == "decode" else kind


def graph_file(key: str, precision: str) -> str:
    return f"{key}.{precision}.onnx"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: list[int | str]  # "batch" marks the dynamic axis
    dtype: str  # numpy name: "float32", "float16", ...


@dataclass(frozen=True)
class GraphInfo:
    """One ONNX file of the export."""

    kind: str  # encoder | endpoint | denoiser | network | decode
    precision: str  # fp32 | fp16
    file: str
    sha256: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    nfe: int  # network (U-Net) evaluations in the graph
    steps: int | None = None  # decode graphs only
    sampler: str | None = None  # decode graphs only

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    sha256: str
    step: int
    weights: str  # "ema" or "model"


@dataclass
class Manifest:
    preset: str
    model_config: dict[str, Any]
    image_shape: list[int]  # C, H, W
    z_dim: int
    opset: int
    exporter: str  # "torchscript" or "dynamo" (torch.onnx.export(dynamo=...))
    torch_version: str
    onnx_version: str
    checkpoint: CheckpointInfo | None  # None: exported from an in-memory model
    graphs: dict[str, dict[str, GraphInfo]] = field(default_factory=dict)  # precision -> key -> graph
    precision_note: str = PRECISION_NOTE
    #: sigma_T of the preconditioning baked into the decode graphs (None: an export from before it was
    #: recorded, made with the trained one)
    sampling_sigma_T: float | None = None
    format: str = FORMAT

    # ----- queries -----
    @property
    def config(self) -> ModelConfig:
        return model_config_from_dict(self.model_config)

    def precisions(self) -> list[str]:
        return list(self.graphs)

    def graph(self, kind: str, precision: str, *, steps: int | None = None, sampler: str | None = None) -> GraphInfo:
        """The graph of ``kind`` (and decode setting) at ``precision``; ConfigError if not exported."""
        if precision not in self.graphs:
            raise ConfigError(
                f"this export has no {precision} graphs (it has: {', '.join(self.graphs) or 'none'}); "
                f"export again with --precision {precision}"
            )
        key = graph_key(kind, steps, sampler)
        found = self.graphs[precision].get(key)
        if found is None:
            have = ", ".join(k for k in self.graphs[precision] if k.startswith(kind)) or "none"
            what = f"{sampler} decode with {steps} steps" if kind == "decode" else f"{kind} graph"
            raise ConfigError(f"this export has no {what} at {precision} (it has: {have}); export it with dbae export")
        return found

    def decode_settings(self, precision: str) -> list[tuple[int, str]]:
        """(steps, sampler) of every decode graph at ``precision``."""
        return sorted((g.steps, g.sampler) for g in self.graphs.get(precision, {}).values() if g.kind == "decode")

    def check_config(self, config: ModelConfig, what: str = "the model") -> None:
        """ConfigError unless ``config`` is the configuration this export was made from."""
        if dumps(config) != dumps(self.config):
            raise ConfigError(
                f"this export was made for preset {self.preset!r} (image {tuple(self.image_shape)}, z_dim "
                f"{self.z_dim}), which does not match {what} (image ({config.image_channels}, {config.image_size}, "
                f"{config.image_size}), z_dim {config.z_dim}); export that model again"
            )

    # ----- (de)serialisation -----
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Manifest:
        data = dict(data)
        ckpt = data.pop("checkpoint")
        graphs = {
            precision: {key: _graph_from_dict(g) for key, g in by_key.items()}
            for precision, by_key in data.pop("graphs").items()
        }
        return Manifest(**data, checkpoint=CheckpointInfo(**ckpt) if ckpt else None, graphs=graphs)


def _graph_from_dict(data: dict[str, Any]) -> GraphInfo:
    data = dict(data)
    inputs = [TensorInfo(**t) for t in data.pop("inputs")]
    outputs = [TensorInfo(**t) for t in data.pop("outputs")]
    return GraphInfo(**data, inputs=inputs, outputs=outputs)


def read_manifest(export_dir: str | Path, *, verify_files: bool = True) -> Manifest:
    """The manifest of an export folder, with every listed graph file present (and, if
    ``verify_files``, matching its sha256). ConfigError with the reason otherwise."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not export_dir.is_dir():
        raise ConfigError(f"no export folder at {export_dir} (make one with: dbae export --ckpt CKPT --out {export_dir})")
    if not path.is_file():
        raise ConfigError(f"{export_dir} is not a complete dbae export: it has no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a dbae export manifest (format {data.get('format')!r}, expected {FORMAT!r})")
        manifest = Manifest.from_dict(data)
        manifest.config  # noqa: B018  (validates the stored model configuration)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    for by_key in manifest.graphs.values():
        for g in by_key.values():
            file = export_dir / g.file
            if not file.is_file():
                raise ConfigError(f"export {export_dir} is incomplete: {g.file} is missing")
            if verify_files and sha256_file(file) != g.sha256:
                raise ConfigError(f"export {export_dir} is damaged: {g.file} does not match its sha256 in the manifest")
    return manifest
