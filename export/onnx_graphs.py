"""The nn.Module wrappers that the ONNX export traces, one per exported graph.

Every wrapper takes and returns float32 tensors whatever the dtype of the wrapped model:
a model converted to float16 (``model.half()``) gives the fp16 graphs, whose networks run in
float16 while inputs, outputs and the sampler state stay float32.

The decode graph unrolls the reference sampler (:meth:`dbae.sampling.BridgeSampler.sample`,
pure PyTorch, never the fused ``torch.ops.dbae`` steps) with a denoiser whose
preconditioning scalars are computed on the host in float64 at export time, exactly as
:meth:`dbae.model.DBAE.denoise` computes them, and stored as float32 constants: the graph
holds no float64 arithmetic (TensorRT has none) and no data-dependent control flow.
"""

from __future__ import annotations

import torch
from torch import nn

from dbae.model import DBAE

from .runner import DecodeSetting

Tensor = torch.Tensor


class _ModelGraph(nn.Module):
    """A graph of ``model``: the model, and the dtype its weights hold (the networks' inputs
    are cast to it)."""

    def __init__(self, model: DBAE) -> None:
        super().__init__()
        self.model = model
        self.dtype = next(model.parameters()).dtype


class EncoderGraph(_ModelGraph):
    """images (B, C, H, W) -> z (B, z_dim): the encoder mean, one pass."""

    input_names = ("images",)
    output_names = ("z",)
    nfe = 0

    def forward(self, images: Tensor) -> Tensor:
        return self.model.encode(images.to(self.dtype)).float()


class EndpointGraph(_ModelGraph):
    """z (B, z_dim) -> x_T = Dec(z) (B, C, H, W)."""

    input_names = ("z",)
    output_names = ("x_T",)
    nfe = 0

    def forward(self, z: Tensor) -> Tensor:
        return self.model.endpoint(z.to(self.dtype)).float()


class DenoiserGraph(_ModelGraph):
    """One denoiser evaluation (x_t, t, x_T, z) -> D (not clamped); t has shape (B,).

    The preconditioning is computed from t inside the graph in float64 (as in
    :meth:`DBAE.denoise`), so this graph is for ONNX Runtime; the runtimes' decode uses the
    unrolled graph.
    """

    input_names = ("x_t", "t", "x_T", "z")
    output_names = ("D",)
    nfe = 1

    def forward(self, x_t: Tensor, t: Tensor, x_T: Tensor, z: Tensor) -> Tensor:
        dt = self.dtype
        return self.model.denoise(x_t.to(dt), t, x_T.to(dt), z.to(dt)).float()


class NetworkGraph(_ModelGraph):
    """The score U-Net alone, (x_in, c_noise, x_T, z) -> F, with x_in = c_in x_t; c_noise has
    shape (B,). The preconditioning stays on the host (float64 scalars, as
    :meth:`DBAE.network_output` computes them), so one graph serves every decode setting: the
    ``onnxruntime-step`` runner drives the project's own sampler (and fused steps) with it.
    c_noise stays float32 at every precision (the U-Net's time embedding casts it after its
    sinusoids, as :class:`dbae.export.torch_runners.CastNetwork` runs it)."""

    input_names = ("x_in", "c_noise", "x_T", "z")
    output_names = ("F",)
    nfe = 1

    def forward(self, x_in: Tensor, c_noise: Tensor, x_T: Tensor, z: Tensor) -> Tensor:
        dt = self.dtype
        return self.model.unet(x_in.to(dt), c_noise, x_T.to(dt), z.to(dt)).float()


class DecodeGraph(_ModelGraph):
    """z (B, z_dim) -> images (B, C, H, W) in [-1, 1]: x_T = Dec(z), then ``setting.steps``
    unrolled steps of ``setting.sampler`` (ODE, no churn), D clamped as in :meth:`DBAE.decode`."""

    input_names = ("z",)
    output_names = ("images",)

    def __init__(self, model: DBAE, setting: DecodeSetting) -> None:
        super().__init__(model)
        self.setting = setting
        self.nfe = setting.nfe
        plan = model.sampler.plan(setting.steps, setting.sampler, 0.0)
        # every time the denoiser is evaluated at: t_hat_i (= t_i), and t_{i+1} for Heun's corrector
        times = sorted({*plan.t_hats, *(plan.ts[1:-1] if plan.ode_next is not None else [])})
        self._slots = {t: i for i, t in enumerate(times)}
        pre = model.sampling_bridge.preconditioning(torch.tensor(times, dtype=torch.float64))
        for name in ("c_in", "c_skip", "c_out", "c_noise"):  # float64 on the host -> float32, as DBAE.denoise
            self.register_buffer(name, getattr(pre, name).to(torch.float32), persistent=False)

    def _denoise(self, x: Tensor, t: float, x_T_net: Tensor, z_net: Tensor) -> Tensor:
        i = self._slots[t]
        c_noise = self.c_noise[i : i + 1].expand(x.shape[0])
        F = self.model.unet((self.c_in[i] * x).to(self.dtype), c_noise, x_T_net, z_net)
        return (self.c_skip[i] * x + self.c_out[i] * F.float()).clamp(-1.0, 1.0)

    def forward(self, z: Tensor) -> Tensor:
        z_net = z.to(self.dtype)
        x_T = self.model.endpoint(z_net).float()
        x_T_net = x_T.to(self.dtype)
        s = self.setting
        result = self.model.sampler.sample(
            lambda x, t: self._denoise(x, t, x_T_net, z_net), x_T, steps=s.steps, sampler=s.sampler
        )
        return result.images.clamp(-1.0, 1.0)
