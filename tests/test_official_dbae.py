"""The authors' released DBAE checkpoints: recognition, exact conversion and numerical parity.

The fixtures (tests/fixtures/official_dbae, see its README.md) were made with the authors'
own code at their commit 533f564: the key lists of the four released models, two tiny
random-weight checkpoints in their exact file format (every tensor made non-trivial, so a
mis-mapped one shows), and their encoder, endpoint, network, denoiser and sampler outputs
in float64. The parity targets are those float64 outputs: in float64, networks within 1e-10
and samplers within 1e-9; in float32, within twice what the authors' own float32 run
differs from their float64 run (the README's section 3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbae.bridge import karras_grid
from dbae.checkpoints import official_dbae
from dbae.checkpoints.foreign import load_weights_only
from dbae.checkpoints.imports import read_foreign
from dbae.checkpoints.official_parity import max_errors, our_outputs
from dbae.config import OFFICIAL_DBAE, get_preset
from dbae.model import DBAE

FIXTURES = Path(__file__).parent / "fixtures" / "official_dbae"
#: the tiny fixtures' U-Net attention: 16 channels per head (the released models: 64)
TINY_HEAD_CHANNELS = 16
KEYMAPS = {"ffhq128_sto": "ffhq128-official", "ffhq128_det": "ffhq128-official-d",
           "celeba64_sto": "celeba64-official", "celeba64_det": "celeba64-official-d"}
#: the authors' float32 run against their float64 run, max |difference| (README section 3)
AUTHORS_F32 = {
    "tiny64_sto": {"enc_raw": 1.1e-7, "mu": 1.1e-7, "sigma": 9.8e-8, "z": 2.6e-7, "xT": 9.3e-8,
                   "dec_feat_4": 2.1e-7, "emb_label": 2.5e-7,
                   "F_A_ed0.5": 4.0e-6, "D_A_ed0.5": 1.9e-6, "F_A_ed0": 1.2e-5, "D_A_ed0": 6.1e-6,
                   "F_B_ed0.5": 9.1e-6, "D_B_ed0.5": 1.2e-6,
                   "sample_euler5_ed0.5": 3.3e-4, "sample_euler5_ed0": 1.9e-3, "sample_heun3_ed0.5": 3.0e-2,
                   "sample_heun3_ed0": 5.4e-2, "sample_heun3_churn0.33_ed0": 5.1e-2},
    "tiny128_det": {"z": 6.4e-8, "xT": 4.0e-8, "dec_feat_4": 6.5e-8, "emb_label": 3.6e-8,
                    "sample_euler5_ed0": 6.0e-3},
}


def fixture_file(name: str) -> Path:
    return FIXTURES / name / "ema_0.9999_000000.pt"


def _load(name: str, dtype: torch.dtype):
    """(model in ``dtype``, inputs, float64 references) of a tiny fixture, converted in memory."""
    foreign = read_foreign(fixture_file(name), num_head_channels=TINY_HEAD_CHANNELS, dtype=dtype)
    model = DBAE(foreign.preset.model).to(dtype).eval()
    model.load_state_dict(foreign.state)
    inputs = {k: v.to(dtype) for k, v in load_file(FIXTURES / name / "inputs.safetensors").items()}
    return model, inputs, load_file(FIXTURES / name / "reference_f64.safetensors")


#: the sampler runs are compared on the first image of the batch (each image is integrated
#: independently, and the networks are compared on the whole batch): a quarter of the time
SAMPLED = slice(0, 1)


@pytest.fixture(scope="module", params=["tiny64_sto", "tiny128_det"])
def float64_errors(request):
    model, inputs, ref = _load(request.param, torch.float64)
    ours = our_outputs(model, inputs, ref, SAMPLED)
    return request.param, ours, max_errors(ours, ref, SAMPLED), ref


def test_every_reference_tensor_in_float64(float64_errors):
    """Encoder (raw head, mu, log sigma, sigma, z), endpoint, the decoder's 4x4 seed, both
    embeddings, the preconditioning at both sigma_T, F and D at eight times, and all six
    sampler runs (Euler, Heun, churn with the authors' noise): the networks within 1e-10, the
    samplers within 1e-9 of the authors' float64 outputs."""
    name, ours, errors, ref = float64_errors
    compared = []
    for key, err in errors.items():
        if key.startswith("nfe_"):
            assert err == 0, key
            continue
        tol = 1e-9 if key.startswith("sample_") else 1e-10
        assert err <= tol, f"{name} {key}: max |ours - authors'| = {err:.3g} > {tol:g}"
        compared.append(key)
    # nothing in the reference file was left out but the decoder's spectral-norm divisors
    # (next test) and the time grids (the one after)
    left = {k for k in ref if k not in ours and not k.startswith(("sn_sigma.", "t_grid_"))}
    assert not left, f"reference tensors not compared: {sorted(left)}"
    assert len(compared) >= (32 if name == "tiny64_sto" else 5)


@pytest.mark.parametrize("name", ["tiny64_sto", "tiny128_det"])
def test_spectral_norm_divisors_and_time_grids(name):
    """sigma = u . (W v) from the stored vectors, for every spectral-normed conv (the
    transposed seed conv along its dim 1), and the Karras grids of the runs."""
    state = load_weights_only(fixture_file(name))
    ref = load_file(FIXTURES / name / "reference_f64.safetensors")
    sigmas = [k for k in ref if k.startswith("sn_sigma.")]
    assert len(sigmas) >= 9
    for key in sigmas:
        module = key.removeprefix("sn_sigma.")
        dim = 1 if module == "decoder.init.init.0" else 0
        sigma = official_dbae.spectral_sigma(*(state[f"{module}.weight_{s}"] for s in ("orig", "u", "v")), dim)
        assert abs(sigma.item() - ref[key].item()) < 1e-12, key
    for n in (3, 5):
        if f"t_grid_{n}" in ref:
            assert torch.allclose(torch.tensor(karras_grid(n), dtype=torch.float64), ref[f"t_grid_{n}"],
                                  rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["tiny64_sto", "tiny128_det"])
def test_float32_within_the_authors_own_float32_error(name):
    """Converted in float32 (the derived weights rounded once) and run in float32 (the
    samplers through the fused steps where built): within twice the authors' float32 error."""
    model, inputs, ref = _load(name, torch.float32)
    errors = max_errors(our_outputs(model, inputs, ref, SAMPLED), ref, SAMPLED)
    for key, tol in AUTHORS_F32[name].items():
        err = errors[key]
        assert err <= 2 * tol, f"{name} {key}: max |ours - authors' float64| = {err:.3g} > 2 x {tol:g}"


@pytest.mark.parametrize("keymap", sorted(KEYMAPS))
def test_released_layouts_map_key_for_key(keymap):
    """For each released model's full key list: recognised as its preset, every key of the
    file used (only feat_256 and the BatchNorm counters left out), every weight of our networks
    filled with the right shape, and the parameter counts equal the authors' (built on the
    meta device: no memory)."""
    data = json.loads((FIXTURES / "keymaps" / f"{keymap}.json").read_text())
    state = {k: torch.empty(shape, dtype=getattr(torch, dt), device="meta") for k, shape, dt in data["keys"]}
    assert len(state) == data["n_tensors"]
    preset = official_dbae.recognise(state, keymap)
    assert preset.name == KEYMAPS[keymap]
    conv = official_dbae.convert(state, preset, keymap)
    feat_256 = [k for k in state if k.startswith(official_dbae.UNUSED_PREFIX)]
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert sorted(conv.dropped) == sorted(set(feat_256 + counters)) and len(feat_256) == 8
    with torch.device("meta"):
        model = DBAE(preset.model)
    assert {k: tuple(v.shape) for k, v in conv.state.items()} == {k: tuple(v.shape)
                                                                  for k, v in model.state_dict().items()}
    counts, expected = model.parameter_counts(), data["parameter_counts"]
    assert counts["unet"] == expected["unet_torso"]
    assert counts["encoder"] == expected["encoder"]
    assert counts["decoder"] == expected["decoder"] - data["decoder_feat_256_params_unused_in_forward"]
    assert preset.model.encoder.stochastic == keymap.endswith("_sto")


def test_presets_of_the_released_models():
    """The four presets are the authors' networks: attention at 32, 16, 8 with 64-channel
    heads, one-head encoder attention, the decoder's affine norm and 1x1 bias-free output."""
    assert set(OFFICIAL_DBAE) == set(KEYMAPS.values())
    m = get_preset("ffhq128-official").model
    assert m.unet.attention_resolutions == (32, 16, 8) and m.unet.num_head_channels == 64
    assert m.encoder.num_heads == 1 and m.encoder.attention_resolutions == (16,)
    assert (m.decoder.norm, m.decoder.output_kernel, m.decoder.output_bias) == ("affine", 1, False)


def test_a_mismapped_tensor_breaks_parity():
    """The fixtures catch a wrong conversion: without the qkv reordering, F moves by far more
    than any tolerance (the README measured 0.76)."""
    foreign = read_foreign(fixture_file("tiny64_sto"), num_head_channels=TINY_HEAD_CHANNELS, dtype=torch.float64)
    model = DBAE(foreign.preset.model).double().eval()
    state = dict(foreign.state)
    key = "unet.middle_block.1.qkv.weight"
    heads = model.unet.middle_block[1].num_heads
    # undo the reordering: back to (head, q|k|v, channel)
    w = state[key]
    d = w.shape[0] // (3 * heads)
    state[key] = w.reshape(3, heads, d, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
    model.load_state_dict(state)
    inputs = {k: v.double() for k, v in load_file(FIXTURES / "tiny64_sto" / "inputs.safetensors").items()}
    ref = load_file(FIXTURES / "tiny64_sto" / "reference_f64.safetensors")
    with torch.no_grad():
        F = model.network_output(inputs["xt_A"], inputs["t_A"], ref["xT"], ref["z"])
    assert (F - ref["F_A_ed0.5"]).abs().max() > 1e-3
