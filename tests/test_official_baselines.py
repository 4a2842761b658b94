"""The DiffAE and PDAE authors' released checkpoints: recognition, exact conversion, and
parity with their code (networks, DDIM decode and inversion with their grids, their
trajectories, DiffAE's latent DPM, PDAE's stop_percent).

The fixtures (tests/fixtures/official_diffae and official_pdae, each with its README.md)
were made with the authors' own code: the key lists of their released configs, a tiny
random-weight checkpoint in their file format, and their outputs in float64. In float64:
networks within 1e-10, 10-step DDIM within 1e-9 of theirs; in float32, the tolerances their
READMEs suggest from their own float32-vs-float64 runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbae.baselines.diffae import DiffAE
from dbae.baselines.pdae import PDAE
from dbae.checkpoints import official_diffae, official_pdae
from dbae.checkpoints.imports import read_foreign
from dbae.nn import count_parameters
from dbae.prior.ddim import LatentDiffusion
from dbae.prior.network import MLPSkipNet

FIXTURES = Path(__file__).parent / "fixtures"
DIFFAE = FIXTURES / "official_diffae"
PDAE_DIR = FIXTURES / "official_pdae"
#: the PDAE fixture's U-Net attention heads (their released FFHQ128 DPM is assumed to have 1)
PDAE_TINY_HEADS = 2
#: (networks, decode or inversion alone, inversion then decode) in float32 (their READMEs)
F32 = (1e-5, 2e-4, 5e-3)
#: the DDIM runs are compared on the first image (each image is integrated on its own; the
#: networks are compared on the whole batch): half the time
FIRST = slice(0, 1)


def _err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max())


def _trajectory(steps: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s for s, _ in steps]), torch.stack([x0 for _, x0 in steps])


# ----- DiffAE -----
def diffae_outputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our value of every output of the DiffAE fixture, the checkpoint converted in memory."""
    foreign = read_foreign(DIFFAE / "tiny32_autoenc_latent_last.ckpt")
    model = DiffAE(foreign.preset.model).to(dtype).eval()
    model.load_state_dict(foreign.state)
    prior = foreign.prior
    net = MLPSkipNet(prior.preset.net, prior.mean.shape[0]).to(dtype).eval()
    net.load_state_dict(prior.state)
    r = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(DIFFAE / "tiny32_reference_f64.safetensors").items()}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out["z_sem"] = model.encode(r["images"])
        out["eps_out"] = model.eps(r["eps_x_t"], r["eps_t"], r["z_sem"])
        steps: list = []
        inv = model.infer_x_T(r["images"][FIRST], r["z_sem"][FIRST], 10, trajectory=steps)
        out["inv_x_T"] = inv.x_T
        out["inv_traj_sample"], out["inv_traj_pred_xstart"] = _trajectory(steps)
        steps = []
        dec = model.decode(r["z_sem"][FIRST], r["ddim_x_T"][FIRST], 10, trajectory=steps)
        out["dec_raw"], out["dec_render"] = dec.images, (dec.images + 1) / 2
        out["dec_traj_sample"], out["dec_traj_pred_xstart"] = _trajectory(steps)
        out["recon_raw"] = model.decode(r["z_sem"][FIRST], inv.x_T, 10).images
        out["latent_eps_out"] = net(r["latent_z_t"], r["eps_t"])
        z0 = LatentDiffusion(prior.preset.diffusion).sample(net, r["uncond_latent_noise"][FIRST], 10)
        out["uncond_latent_z0"] = z0
        out["uncond_cond"] = z0 * prior.std.to(dtype) + prior.mean.to(dtype)
        raw = model.decode(out["uncond_cond"], r["uncond_x_T"][FIRST], 10).images
        out["uncond_raw"], out["uncond_sample"] = raw, (raw + 1) / 2
    return out


def _diffae_reference(ref: dict, key: str) -> torch.Tensor:
    """The reference of ``key`` for the DDIM runs on the first image (trajectories: (steps, batch, ...))."""
    if key not in DIFFAE_DDIM:
        return ref[key]
    return ref[key][:, FIRST] if "traj" in key else ref[key][FIRST]


DIFFAE_DDIM = {"inv_x_T", "inv_traj_sample", "inv_traj_pred_xstart", "dec_raw", "dec_render", "dec_traj_sample",
               "dec_traj_pred_xstart", "recon_raw", "uncond_latent_z0", "uncond_cond", "uncond_raw", "uncond_sample"}


def test_diffae_every_output_in_float64():
    """Encoder, eps network, the latent net, DDIM inversion and decode (with each step's
    state and x0_hat) on their grid (t = 0, 100, ..., 900; inversion to abar = 0), the
    latent DDIM and the unconditional sample: networks within 1e-10, DDIM within 1e-9."""
    ref = load_file(DIFFAE / "tiny32_reference_f64.safetensors")
    ours = diffae_outputs(torch.float64)
    for key, value in ours.items():
        tol = 1e-9 if key in DIFFAE_DDIM else 1e-10
        assert _err(value, _diffae_reference(ref, key)) <= tol, (key, _err(value, _diffae_reference(ref, key)))
    assert set(ref) - set(ours) == {"images", "eps_x_t", "eps_t", "ddim_x_T", "latent_z_t", "uncond_x_T",
                                    "uncond_latent_noise"}  # the inputs  # fmt: skip


def test_diffae_float32_within_their_tolerances():
    ref = load_file(DIFFAE / "tiny32_reference_f64.safetensors")
    ours = diffae_outputs(torch.float32)
    for key, value in ours.items():
        tol = F32[2] if key in ("recon_raw", "inv_traj_pred_xstart") else F32[1] if key in DIFFAE_DDIM else F32[0]
        if key.startswith("uncond_latent") or key == "uncond_cond":
            tol = 1e-4  # the latent chain reaches values of 184; relative 3e-7 (their README)
        assert _err(value, _diffae_reference(ref, key)) <= tol, (key, _err(value, _diffae_reference(ref, key)))


@pytest.mark.parametrize("keymap, name", [("ffhq128_autoenc_130M", "ffhq128-official"),
                                          ("ffhq256_autoenc", "ffhq256-official"),
                                          ("celeba64d2c_autoenc", "celeba64-official"),
                                          ("ffhq128_autoenc_latent", "ffhq128-official"),
                                          ("ffhq256_autoenc_latent", "ffhq256-official")])
def test_diffae_released_layouts_map_key_for_key(keymap, name):
    """Every released config's key list: recognised as its preset, every key used (only x_T,
    model.*, the duplicate linear_emb left out), every weight filled; the parameter totals equal
    theirs (meta device)."""
    data = json.loads((DIFFAE / "keymaps" / f"{keymap}.json").read_text())
    state = {e["key"]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]), device="meta")
             for e in data["state_dict"]}  # fmt: skip
    obj = {"state_dict": state, "global_step": 0}
    layout = official_diffae.infer_layout(obj, keymap)
    assert official_diffae.recognised_name(layout.model) == name
    auto, latent = official_diffae.convert(obj, layout, keymap)
    with torch.device("meta"):
        model = DiffAE(layout.model)
    totals = data["param_totals"]
    assert count_parameters(model.unet) == totals["model.<unet> (all model.* except encoder and latent_net)"]
    assert count_parameters(model.encoder) == totals["model.encoder"]
    assert (latent is None) == (totals["model.latent_net"] == 0)
    if latent is not None:
        with torch.device("meta"):
            net = MLPSkipNet(layout.latent, 512)
        assert count_parameters(net) == totals["model.latent_net"]
        assert {k for k in latent.state} == {*net.state_dict(), "latent_mean", "latent_std"}


# ----- PDAE -----
def pdae_outputs(dtype: torch.dtype, ddim: tuple[str, ...] = ("dec_x0", "dec_x0_stop0.3", "inv_x_T", "recon_x0",
                                                               "dpm_dec_x0", "dpm_inv_x_T")) -> dict[str, torch.Tensor]:
    """Our value of the PDAE fixture's outputs (of the DDIM runs ``ddim``, on the first image)."""
    foreign = read_foreign(PDAE_DIR / "tiny64_checkpoint.pt", num_heads=PDAE_TINY_HEADS)
    model = PDAE(foreign.preset.model).to(dtype).eval()
    model.load_state_dict(foreign.state)
    r = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(PDAE_DIR / "tiny64_reference_f64.safetensors").items()}
    out: dict[str, torch.Tensor] = {}
    plain = lambda x, t, shift: model.eps_net(x, t)  # noqa: E731  (the DPM alone)
    z, x_T, x0 = r["z"][FIRST], r["ddim_x_T"][FIRST], r["images"][FIRST]
    with torch.no_grad():
        out["z"] = model.encode(r["images"])
        out["eps_out"], out["grad_out"] = model.eps_and_gradient(r["eps_x_t"], r["eps_t"], r["z"])
        if "dec_x0" in ddim:
            out["dec_x0"] = model.decode(z, x_T, 10).images
        if "dec_x0_stop0.3" in ddim:
            out["dec_x0_stop0.3"] = model.decode(z, x_T, 10, stop_percent=0.3).images
        if "inv_x_T" in ddim or "recon_x0" in ddim:
            out["inv_x_T"] = model.infer_x_T(x0, z, 10).x_T
        if "recon_x0" in ddim:
            out["recon_x0"] = model.decode(z, out["inv_x_T"], 10).images
        if "dpm_dec_x0" in ddim:
            out["dpm_dec_x0"] = model.schedule.run(plain, x_T, model.schedule.ddim_plan("pdae", 10), clip=True).x
        if "dpm_inv_x_T" in ddim:
            out["dpm_inv_x_T"] = model.schedule.run(plain, x0, model.schedule.ddim_plan("pdae", 10, invert=True),
                                                    clip=True).x  # fmt: skip
    return out


def _pdae_reference(ref: dict, key: str) -> torch.Tensor:
    return ref[key] if key in ("z", "eps_out", "grad_out") else ref[key][FIRST]


PDAE_DDIM = {"dec_x0", "dec_x0_stop0.3", "inv_x_T", "dpm_dec_x0", "dpm_inv_x_T"}


def test_pdae_every_output_in_float64():
    """Encoder, eps and G from one pass of the shift U-Net, DDIM decode (unclamped, never at
    t = 0), with stop_percent 0.3, inversion, reconstruction, and the plain DPM's DDIM on its
    grid (t = 0, 99, ..., 999)."""
    ref = load_file(PDAE_DIR / "tiny64_reference_f64.safetensors")
    ours = pdae_outputs(torch.float64)
    for key, value in ours.items():
        tol = 1e-9 if key in PDAE_DDIM or key == "recon_x0" else 1e-10
        assert _err(value, _pdae_reference(ref, key)) <= tol, (key, _err(value, _pdae_reference(ref, key)))
    assert ours["dec_x0"].abs().max() > 1.0  # their decode is not clamped (1.042 in the fixture)
    timesteps = [step.t for step in PDAE(read_foreign(PDAE_DIR / "tiny64_checkpoint.pt", num_heads=2)
                                          .preset.model).schedule.ddim_plan("pdae", 10, invert=True)]  # fmt: skip
    assert timesteps + [999] == ref["ddim10_timestep_map"].tolist()


def test_pdae_float32_within_their_tolerances():
    """The networks, a decode and an inversion (the float64 test covers the other runs)."""
    ref = load_file(PDAE_DIR / "tiny64_reference_f64.safetensors")
    for key, value in pdae_outputs(torch.float32, ("dec_x0", "inv_x_T")).items():
        tol = 5e-4 if key in PDAE_DDIM else F32[0]
        assert _err(value, _pdae_reference(ref, key)) <= tol, (key, _err(value, _pdae_reference(ref, key)))


def test_pdae_released_layout_maps_key_for_key():
    """FFHQ128's encoder and its (assumed) shift U-Net decoder: every key used, every weight
    filled, the parameter totals equal theirs (meta device)."""
    keymaps = PDAE_DIR / "keymaps"

    def meta(name: str) -> dict[str, torch.Tensor]:
        data = json.loads((keymaps / name).read_text())
        return {e["key"]: torch.empty(e["shape"], device="meta") for e in data["state_dict"]}

    obj = {"ema_encoder": meta("ffhq128_encoder.json"), "ema_decoder": meta("ffhq128_ASSUMED_shift_unet_decoder.json"),
           "step": 0}  # fmt: skip
    assert official_pdae.looks_like(obj)
    layout = official_pdae.infer_layout(obj, "ffhq128")
    conv = official_pdae.convert(obj, layout, "ffhq128")
    with torch.device("meta"):
        model = PDAE(layout.model)
    decoder = json.loads((keymaps / "ffhq128_ASSUMED_shift_unet_decoder.json").read_text())["param_totals"]
    assert count_parameters(model.eps_net) == decoder["frozen half (= the DPM U-Net)"]
    assert count_parameters(model.gradient_net) == decoder["trainable (label_emb, shift_middle_block, shift_output_blocks, shift_out)"]
    assert count_parameters(model.encoder) == json.loads((keymaps / "ffhq128_encoder.json").read_text())["param_total"]
    assert layout.model.image_size == 128 and len(conv.state) == len(model.state_dict())


def test_the_authors_files_import_as_runs_of_their_methods(tmp_path, capsys):
    """`dbae import` writes a DiffAE run (with its latent DPM as the run's prior) and a PDAE run;
    both load through every --ckpt (reconstruct), DiffAE generates from its prior, and the
    import records where they came from."""
    from dbae.baselines.checkpoints import load_any
    from dbae.cli.main import main
    from dbae.prior.checkpoint import load_prior

    dae, pdae = tmp_path / "diffae", tmp_path / "pdae"
    assert main(["import", str(DIFFAE / "tiny32_autoenc_latent_last.ckpt"), "--out", str(dae)]) == 0
    assert main(["import", str(PDAE_DIR / "tiny64_checkpoint.pt"), "--out", str(pdae), "--num-heads", "2"]) == 0
    for run, method in ((dae, "diffae"), (pdae, "pdae")):
        record = json.loads((run / "import.json").read_text())
        assert record["method"] == method and len(record["source_sha256"]) == 64
        assert load_any(run).method == method
    prior = load_prior(dae / "prior")
    assert prior.preset.diffusion.spacing == "diffae" and prior.z_dim == 64
    assert main(["generate", "--ckpt", str(dae), "--n", "2", "--nfe", "2", "--prior-steps", "2", "--no-progress",
                 "--out", str(tmp_path / "gen")]) == 0  # fmt: skip
    assert (tmp_path / "gen" / "grid.png").is_file()
    assert main(["reconstruct", "--ckpt", str(pdae), "--dataset", "shapes", "--n", "1", "--resize",
                 "--inversion-steps", "2", "--decode-steps", "2", "--out", str(tmp_path / "r.png")]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(pdae), "--n", "1", "--out", str(tmp_path / "g2")]) == 2
    assert "DiffAE" in capsys.readouterr().err
