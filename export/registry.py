"""The runner kinds by name, and how to make each one for a model (used by ``dbae bench``).

A factory is a function of the decode setting (runners fix their decode length when
made). Asking for a kind that cannot run here raises :class:`dbae.errors.ConfigError`
that says why and what to install.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dbae.errors import ConfigError
from dbae.model import DBAE

from .runner import DecodeSetting, Runner
from .torch_runners import CUDAGraphRunner, EagerRunner

RunnerFactory = Callable[[DecodeSetting], Runner]


def _eager(model: DBAE, precision: str) -> RunnerFactory:
    return lambda setting: EagerRunner(model, setting, precision=precision)


def _cuda_graph(model: DBAE, precision: str) -> RunnerFactory:
    if next(model.parameters()).device.type != "cuda":
        raise ConfigError("runner cuda-graph needs a CUDA device (pass --device cuda on a machine with a GPU)")
    return lambda setting: CUDAGraphRunner(model, setting, precision=precision)


#: kind -> (make a factory for (model, precision), one-line description)
KINDS: dict[str, tuple[Callable[[DBAE, str], RunnerFactory], str]] = {
    "eager": (_eager, "DBAE in eager PyTorch (the baseline)"),
    "cuda-graph": (_cuda_graph, "encode / decode / edit captured as CUDA graphs (GPU)"),
}


def default_kinds(device: torch.device) -> list[str]:
    """What ``dbae bench latency`` compares when no runner is named."""
    return ["eager", "cuda-graph"] if device.type == "cuda" else ["eager"]


def factory(kind: str, model: DBAE, precision: str) -> RunnerFactory:
    if kind not in KINDS:
        raise ConfigError(f"unknown runner {kind!r}; choose from: {', '.join(KINDS)}")
    return KINDS[kind][0](model, precision)
