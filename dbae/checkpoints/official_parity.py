"""This package's value of each tensor that the DBAE authors' parity fixtures record.

The fixtures made with the authors' own code (``tests/fixtures/official_dbae``: their
README.md says how) hold, for a tiny model in their checkpoint format, their encoder, decoder,
network, denoiser and sampler outputs on fixed inputs, in float64 and float32.
:func:`our_outputs` computes the same quantities with a converted :class:`dbae.model.DBAE`,
under the same names, so that a test or a benchmark compares them key by key
(:func:`max_errors`).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..model import DBAE
from ..nn.layers import timestep_embedding

Tensor = torch.Tensor

#: the fixtures' sampler runs: name -> (sampler, NFE budget, churn, sigma_T while sampling)
RUNS = {
    "euler5_ed0.5": ("euler", 5, 0.0, 0.5), "euler5_ed0": ("euler", 5, 0.0, 0.0),
    "heun3_ed0.5": ("heun", 5, 0.0, 0.5), "heun3_ed0": ("heun", 5, 0.0, 0.0),
    "heun3_churn0.33_ed0": ("heun", 8, 0.33, 0.0),
}
#: the fixtures' network calls: (call, sigma_T of the preconditioning)
CALLS = (("A", "0.5"), ("A", "0"), ("B", "0.5"))


@torch.no_grad()
def our_outputs(model: DBAE, inputs: Mapping[str, Tensor], ref: Mapping[str, Tensor],
                rows: slice = slice(None)) -> dict[str, Tensor]:  # fmt: skip
    """Our value of every reference tensor in ``ref``: ``model`` (in eval mode, in the dtype
    of the comparison) on the fixture's ``inputs`` (in that dtype). As in the authors' calls,
    the network calls get the references' z and x_T. The sampler runs integrate the images
    ``rows`` of the batch (each image is integrated on its own). The model's sampling sigma_T
    is left as it was."""
    dtype = next(model.parameters()).dtype
    z, x_T = ref["z"].to(dtype), ref["xT"].to(dtype)
    previous = model.sampling_sigma_T
    out: dict[str, Tensor] = {}
    x0 = inputs["x0"]
    if model.encoder.stochastic:
        out["enc_raw"] = model.encoder.head_output(x0)
        mu, sigma = model.encoder(x0)
        out.update(mu=mu, sigma=sigma, logsig=torch.log(sigma - 0.01), z=mu + sigma * inputs["eps"])
    else:
        out["z"] = model.encode(x0)
    out["xT"] = model.endpoint(z)
    out["dec_feat_4"] = model.decoder.init(z[:, :, None, None])
    out["emb_label"] = model.unet.z_embed(z)
    try:
        for call, ed in CALLS if "t_A" in inputs else ():
            t, x_t = inputs[f"t_{call}"], inputs[f"xt_{call}"]
            model.set_sampling_sigma_T(float(ed))
            pre = model.sampling_bridge.preconditioning(t.to(torch.float64))
            for c in ("c_in", "c_skip", "c_out"):
                out[f"{c}_{call}_ed{ed}"] = getattr(pre, c)
            out[f"c_noise_{call}"] = pre.c_noise
            sinusoids = timestep_embedding(pre.c_noise.to(torch.float64 if dtype == torch.float64 else torch.float32),
                                           model.unet.base_channels)  # fmt: skip
            out[f"emb_time_{call}"] = model.unet.time_embed(sinusoids.to(dtype))
            out[f"F_{call}_ed{ed}"] = model.network_output(x_t, t, x_T, z)
            out[f"D_{call}_ed{ed}"] = model.denoise(x_t, t, x_T, z)
        for run, (sampler, nfe, churn, sigma_T) in RUNS.items():
            if f"sample_{run}" not in ref:
                continue
            model.set_sampling_sigma_T(sigma_T)
            noise = [inputs[f"churn_noise_{i}"][rows] for i in range(3)] if churn else None
            result = model.decode(z[rows], nfe, sampler=sampler, churn=churn, x_T=x_T[rows], churn_noise=noise)
            out[f"sample_{run}"] = result.images
            out[f"nfe_{run}"] = torch.tensor(result.nfe)
    finally:
        model.set_sampling_sigma_T(previous)
    return out


def max_errors(ours: Mapping[str, Tensor], ref: Mapping[str, Tensor], rows: slice = slice(None)) -> dict[str, float]:
    """max |ours - reference| per tensor (the sampler runs on ``rows``), in float64; for the
    NFE counts, their difference."""
    errors = {}
    for key, value in ours.items():
        expected = ref[key][rows] if key.startswith("sample_") else ref[key]
        errors[key] = float((value.double() - expected.double()).abs().max())
    return errors
