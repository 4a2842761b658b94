"""The PDAE baseline (dbae.baselines.pdae): the mean-shift formula against a closed-form
Gaussian problem, a tiny PDAE (DDPM pre-trained, then frozen) on shapes, NFE accounting,
checkpoints and error messages. CPU only; about 35 s on one core."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dbae.baselines.ddim import gaussian_eps
from dbae.baselines.pdae import PDAE
from dbae.baselines.pdae_config import PDAEConfig, pdae_preset, pdae_preset_from_dict
from dbae.baselines.pdae_train import load_pdae, read_pdae_checkpoint, train_ddpm, train_pdae
from dbae.config import EncoderConfig, to_dict
from dbae.data.shapes import ShapesDataset
from dbae.errors import CheckpointError, ConfigError, DataError

# ----- (1) the mean shift against a closed-form Gaussian problem -----
# data x_0 ~ N(M, S^2) per element; the latent is a noisy copy z = x_0 + R n, n ~ N(0, I).
M, S, R = 0.3, 0.5, 0.4


class _EpsFn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x_t, t)


class _GradFn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.fn(x_t, t, z)


def _level(model: PDAE, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return model.schedule.alphas_bar[t].view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _classifier_gradient(model: PDAE):
    """grad_{x_t} log p(z | x_t) in closed form: x_0 | x_t ~ N(mu_post, v_post) with
    mu_post = M + k (x_t - sqrt(a) M), k = sqrt(a) S^2 / (a S^2 + 1 - a), v_post = S^2 (1 - a) / (a S^2 + 1 - a);
    so z | x_t ~ N(mu_post, v_post + R^2) and the gradient is (z - mu_post) k / (v_post + R^2)."""

    def grad(x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = _level(model, t, x_t)
        z = z.view_as(x_t)
        den = a * S**2 + 1 - a
        k = a.sqrt() * S**2 / den
        mu_post = M + k * (x_t - a.sqrt() * M)
        v_post = S**2 * (1 - a) / den
        return (z - mu_post) * k / (v_post + R**2)

    return grad


def _conditional_eps(model: PDAE, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t, z]: x_0 | z ~ N(m_z, s_z^2) with s_z^2 = (1/S^2 + 1/R^2)^-1 and
    m_z = s_z^2 (M / S^2 + z / R^2), then the Gaussian eps-predictor of that distribution."""
    a = _level(model, t, x_t)
    s2 = 1.0 / (1.0 / S**2 + 1.0 / R**2)
    m_z = s2 * (M / S**2 + z.view_as(x_t) / R**2)
    return (1 - a).sqrt() * (x_t - a.sqrt() * m_z) / (a * s2 + 1 - a)


def _toy_model() -> PDAE:
    cfg = dataclasses.replace(pdae_preset("tiny8").model, image_channels=1, z_dim=64)
    return PDAE(cfg).double()


def test_mean_shift_with_analytic_gradient_is_the_conditional_eps() -> None:
    """eps_theta - sqrt(1 - abar_t) G with the exact unconditional eps and the exact classifier
    gradient is the exact z-conditional eps (DDIM coefficient), at every t; PDAE's training
    coefficient does the same with G rescaled by sqrt(1 - abar_t) / coeff_train(t)."""
    model = _toy_model()
    model.eps_net = _EpsFn(gaussian_eps(M, S, model.schedule.alphas_bar))
    grad = _classifier_gradient(model)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 5, 50, 200, 500, 800, 999])
    x0 = M + S * torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64)
    z = (x0 + R * torch.randn(x0.shape, generator=g, dtype=torch.float64)).view(8, 64)
    x_t = model.schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    want = _conditional_eps(model, x_t, t, z)

    model.gradient_net = _GradFn(grad)
    got = model.shifted_eps(x_t, t, z)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # and the shift matters: the unconditional eps is far from it
    assert (model.eps_net(x_t, t) - want).abs().max() > 0.1

    # PDAE's training coefficient: Sigma_t = beta~_t in eps form, sqrt(alpha_t) sqrt(1-abar_t) / beta_t * beta~_t
    betas, ab = model.schedule.betas, model.schedule.alphas_bar
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    assert torch.allclose(model.train_coef, (1 - betas).sqrt() * (1 - ab).sqrt() / betas * post_var, rtol=1e-12)
    assert model.train_coef[0].item() == 0.0  # G is not used at t = 0 in training
    ts = t[1:]
    model.gradient_net = _GradFn(lambda x, tt, zz: grad(x, tt, zz) * (
        model.coef(tt, "sample", x) / model.coef(tt, "train", x)))
    assert torch.allclose(model.shifted_eps(x_t[1:], ts, z[1:], "train"), want[1:], rtol=0, atol=1e-10)


def test_zero_gradient_is_the_unconditional_ddpm_exactly() -> None:
    """A fresh G (zero-initialised output layer) is G = 0: shifted eps, DDIM inversion and
    decoding are exactly those of the unconditional eps network."""
    torch.manual_seed(0)
    model = PDAE(pdae_preset("tiny8").model).eval()
    with torch.no_grad():  # make the DDPM non-trivial (its own output layer is zero-initialised too)
        model.eps_net.out[-1].weight.normal_(0, 0.1)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z = torch.randn(2, 8)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(model.gradient_net(x, t, z), torch.zeros_like(x))
        eps = model.eps_net(x, t)
        assert eps.abs().max() > 0
        assert torch.equal(model.shifted_eps(x, t, z), eps)
    inv = model.infer_x_T(x, z, 5)
    ref = model.schedule.invert(lambda xt, tt, shift: model.eps_net(xt, tt), x, 5, rule="pdae", clip=True)
    assert torch.equal(inv.x_T, ref.x)
    dec = model.decode(z, inv.x_T, 5)
    ref_dec = model.schedule.sample(lambda xt, tt, shift: model.eps_net(xt, tt), inv.x_T, 5, rule="pdae", clip=True)
    assert torch.equal(dec.images, ref_dec.x)  # PDAE's decode is not clamped


def test_loss_weighting() -> None:
    model = PDAE(pdae_preset("tiny8").model)
    ab = model.schedule.alphas_bar
    snr = ab / (1 - ab)
    assert torch.allclose(model.loss_weight, snr**0.1 / (1 + snr), rtol=1e-12)
    # little weight on high SNR (small t); the maximum sits at SNR = gamma / (1 - gamma) = 1/9
    w = model.loss_weight
    assert w[0].item() < 1e-3 and w.max().item() > 0.3
    peak = int(w.argmax())
    assert abs(snr[peak].item() - 1 / 9) < 0.01
    assert bool((w[1 : peak + 1] > w[:peak]).all()) and bool((w[peak + 1 :] < w[peak:-1]).all())


# ----- (2) a tiny PDAE on shapes -----
DDPM_STEPS, PDAE_STEPS = 120, 90  # (at these, every check below passed by a factor of 1.3 or more)


def _test_images(n: int = 16) -> torch.Tensor:
    data = ShapesDataset(image_size=16, length=n, seed=0, split="test")
    return torch.stack([data[i][0] for i in range(n)])


@pytest.fixture(scope="module")
def trained():
    preset = pdae_preset("tiny16")
    preset = dataclasses.replace(
        preset,
        ddpm_train=dataclasses.replace(preset.ddpm_train, steps=DDPM_STEPS, log_every=25, ckpt_every=DDPM_STEPS),
        train=dataclasses.replace(preset.train, steps=PDAE_STEPS, log_every=25, ckpt_every=PDAE_STEPS),
    )
    data = ShapesDataset(image_size=16, length=10_000, seed=0, split="train")
    ddpm = train_ddpm(preset, data, progress=False, log=lambda m: None)
    pdae = train_pdae(preset, data, ddpm.ema, progress=False, log=lambda m: None)
    return ddpm, pdae


def test_pdae_loss_falls_and_only_encoder_and_G_learn(trained) -> None:
    """Stage 2's weighted loss falls (~0.019 -> ~0.012) and, on a fixed batch, the trained model
    beats its start (G = 0: the DDPM alone, ~0.021 -> ~0.014). The DDPM stays frozen: its weights are
    bit-identical to the pre-trained EMA weights and it gets no gradients."""
    ddpm, pdae = trained
    first, last = pdae.losses[0][1], pdae.losses[-1][1]
    assert math.isfinite(last) and last < 0.85 * first, pdae.losses
    assert ddpm.losses[-1][1] < 0.2 * ddpm.losses[0][1], ddpm.losses

    x = _test_images()
    before = sum(ddpm.ema.loss(x, torch.Generator().manual_seed(i)).loss.item() for i in range(5))
    after = sum(pdae.ema.loss(x, torch.Generator().manual_seed(i)).loss.item() for i in range(5))
    assert after < 0.85 * before, (before, after)

    model = pdae.model
    assert model.ddpm_frozen and not model.eps_net.training
    model.train()
    assert not model.eps_net.training and model.gradient_net.training  # train() keeps the DDPM in eval
    for net in (model, pdae.ema):
        for (k, a), b in zip(ddpm.ema.eps_net.state_dict().items(), net.eps_net.state_dict().values()):
            assert torch.equal(a, b), k
    fresh = PDAE(model.config)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.encoder.parameters(), model.encoder.parameters()))
    assert model.gradient_net.out[-1].weight.abs().max() > 0  # G left zero
    model.zero_grad(set_to_none=True)
    model.loss(x, torch.Generator().manual_seed(0)).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.eps_net.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())
    model.eval()


def test_inferred_x_T_beats_random_x_T(trained) -> None:
    """Reconstruction from the DDIM-inverted x_T (MSE ~3e-3 at 20+20 steps) is far better than
    decoding z from a random x_T (~0.33), which in turn beats the DDPM alone (G = 0, ~0.48):
    z carries part of the image, x_T the rest (the DBAE paper's information split)."""
    ddpm, pdae = trained
    model = pdae.ema
    x = _test_images()
    inferred = model.reconstruct(x, 20, 20)
    rand = model.reconstruct(x, 20, 20, random_x_T=True, generator=torch.Generator().manual_seed(1))
    uncond = ddpm.ema.reconstruct(x, 20, 20, random_x_T=True, generator=torch.Generator().manual_seed(1))
    mse = lambda r: (r.images - x).square().mean().item()  # noqa: E731
    assert mse(inferred) < 0.1 * mse(rand) and mse(inferred) < 0.02, (mse(inferred), mse(rand))
    assert mse(rand) < 0.9 * mse(uncond), (mse(rand), mse(uncond))
    assert inferred.images.shape == x.shape  # not clamped: PDAE's decode ends at level abar[0]
    assert inferred.z.shape == (16, model.config.z_dim)
    again = model.reconstruct(x, 20, 20)
    assert torch.equal(again.x_T, inferred.x_T) and torch.equal(again.images, inferred.images)


# ----- (3) NFE accounting -----
class _CountCalls:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def test_nfe_accounting() -> None:
    """``nfe`` = shifted-eps evaluations = sampler steps; each is exactly one eps_theta and one
    G_psi forward (``network_evals = 2 nfe``); the encoder runs once per reconstruction."""
    torch.manual_seed(0)
    model = PDAE(pdae_preset("tiny8").model).eval()
    eps, grad, enc = _CountCalls(model.eps_net), _CountCalls(model.gradient_net), _CountCalls(model.encoder)
    x = torch.rand(2, 3, 8, 8) * 2 - 1

    z = model.encode(x)
    assert (eps.calls, grad.calls, enc.calls) == (0, 0, 1)
    for steps in (1, 2, 7, 25):
        e0, g0 = eps.calls, grad.calls
        inv = model.infer_x_T(x, z, steps)
        assert inv.nfe == steps == eps.calls - e0 == grad.calls - g0 and inv.network_evals == 2 * steps
        e0, g0 = eps.calls, grad.calls
        dec = model.decode(z, inv.x_T, steps)
        assert dec.nfe == steps == eps.calls - e0 == grad.calls - g0 and dec.network_evals == 2 * steps
    e0, g0, n0 = eps.calls, grad.calls, enc.calls
    rec = model.reconstruct(x, 9, 4)
    assert (rec.inversion_nfe, rec.decode_nfe, rec.nfe, rec.network_evals) == (9, 4, 13, 26)
    assert (eps.calls - e0, grad.calls - g0, enc.calls - n0) == (13, 13, 1)
    e0, g0 = eps.calls, grad.calls
    rnd = model.reconstruct(x, 9, 4, random_x_T=True)
    assert (rnd.inversion_nfe, rnd.decode_nfe, rnd.nfe) == (0, 4, 4) == (0, eps.calls - e0, grad.calls - g0)
    e0, g0 = eps.calls, grad.calls
    out = model.loss(x)
    assert (out.eps_nfe, out.gradient_nfe) == (1, 1) == (eps.calls - e0, grad.calls - g0)
    e0, g0 = eps.calls, grad.calls
    out = model.ddpm_loss(x)
    assert (out.eps_nfe, out.gradient_nfe) == (1, 0) == (eps.calls - e0, grad.calls - g0)


# ----- (4) checkpoints, presets and errors -----
def test_checkpoint_round_trip_and_resume(tmp_path) -> None:
    preset = pdae_preset("tiny8")
    short = dict(steps=4, log_every=1, ckpt_every=2)
    preset = dataclasses.replace(
        preset, ddpm_train=dataclasses.replace(preset.ddpm_train, **short),
        train=dataclasses.replace(preset.train, optimizer="radam", **short),
    )
    data = ShapesDataset(image_size=8, length=64, seed=1, split="train")
    ddpm = train_ddpm(preset, data, out=tmp_path / "ddpm", progress=False, log=lambda m: None)
    assert ddpm.path is not None and read_pdae_checkpoint(ddpm.path).stage == "ddpm"
    full = train_pdae(preset, data, ddpm.path, out=tmp_path / "full", progress=False, log=lambda m: None)
    assert full.path is not None and full.path.name == "step-00000004.safetensors"
    mid = tmp_path / "full" / "checkpoints" / "step-00000002.safetensors"
    assert mid.is_file()

    ckpt = read_pdae_checkpoint(full.path)
    assert (ckpt.step, ckpt.stage) == (4, "pdae") and ckpt.preset == preset and ckpt.optim is not None
    loaded, loaded_preset, stage = load_pdae(full.path)
    assert loaded_preset == preset and stage == "pdae" and not loaded.training and loaded.ddpm_frozen
    for (k, a), (k2, b) in zip(full.ema.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    raw, _, _ = load_pdae(full.path, ema=False)
    for (k, a), b in zip(full.model.state_dict().items(), raw.state_dict().values()):
        assert torch.equal(a, b), k
    # the DDPM is the stage-1 EMA network, unchanged by stage 2
    for a, b in zip(ddpm.ema.eps_net.state_dict().values(), loaded.eps_net.state_dict().values()):
        assert torch.equal(a, b)

    resumed = train_pdae(preset, data, ddpm.ema, out=tmp_path / "resumed", resume=mid, progress=False,
                         log=lambda m: None)
    assert [s for s, _ in resumed.losses] == [3, 4]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="stage"):
        train_ddpm(preset, data, resume=mid, progress=False, log=lambda m: None)
    assert pdae_preset_from_dict(to_dict(preset)) == preset


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no PDAE checkpoint"):
        load_pdae(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pdae(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.w": torch.zeros(1)}, str(foreign), metadata={"format": "dbae-diffae-checkpoint/1"})
    with pytest.raises(CheckpointError, match="not a PDAE checkpoint"):
        load_pdae(foreign)


def test_clear_errors() -> None:
    model = PDAE(pdae_preset("tiny8").model).eval()
    x = torch.zeros(2, 3, 8, 8)
    z = model.encode(x)
    with pytest.raises(DataError, match=r"\(B, 3, 8, 8\)"):
        model.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(DataError, match=r"\(B, 3, 8, 8\)"):
        model.loss(torch.zeros(2, 1, 8, 8))
    with pytest.raises(DataError, match="x_T"):
        model.decode(z, torch.zeros(2, 3, 4, 4), 2)
    with pytest.raises(DataError, match=r"z must have shape \(B, 8\)"):
        model.decode(torch.zeros(2, 5), None, 2)
    with pytest.raises(DataError, match=r"z must have shape \(B, 8\)"):
        model.infer_x_T(x, torch.zeros(2, 5), 2)
    with pytest.raises(DataError, match="3 latents for a batch of 2"):
        model.infer_x_T(x, torch.zeros(3, 8), 2)
    for bad in (0, -3, 1001, 2.5, True):
        with pytest.raises(ConfigError, match="steps"):
            model.decode(z, None, bad)
        with pytest.raises(ConfigError, match="steps"):
            model.infer_x_T(x, z, bad)
    with pytest.raises(ConfigError, match="inversion steps"):
        model.reconstruct(x, 0, 2)
    with pytest.raises(ConfigError, match="decode steps"):
        model.reconstruct(x, 2, 0, random_x_T=True)
    with pytest.raises(ConfigError, match="'sample' or 'train'"):
        model.coef(torch.zeros(2, dtype=torch.long), "guess", x)  # type: ignore[arg-type]
    model.freeze_ddpm()
    with pytest.raises(ConfigError, match="frozen"):
        model.ddpm_loss(x)
    with pytest.raises(ConfigError, match="deterministic"):
        PDAEConfig(encoder=EncoderConfig(stochastic=True))
    with pytest.raises(ConfigError, match="power of two"):
        PDAEConfig(image_size=48)
    with pytest.raises(ConfigError, match="weight_gamma"):
        PDAEConfig(weight_gamma=-0.5)
    with pytest.raises(ConfigError, match="train_shift"):
        PDAEConfig(train_shift="guess")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown PDAE preset"):
        pdae_preset("imagenet512")
    other = dataclasses.replace(pdae_preset("tiny8"), name="tiny16", model=pdae_preset("tiny16").model)
    with pytest.raises(ConfigError, match="U-Net configuration"):
        train_pdae(other, ShapesDataset(image_size=16, length=4, seed=0, split="train"), model, progress=False)


def test_presets_mirror_dbae_backbones() -> None:
    """Same image size, z_dim, U-Net (for eps_theta and G) and encoder as the DBAE preset of the
    same name. FFHQ128: eps_theta about 99M (the public PDAE/DDPM checkpoint's ADM U-Net), G
    another U-Net (~99M; PDAE's shift decoder half is smaller), encoder 24.7M."""
    from dbae.config import get_preset
    from dbae.nn import count_parameters

    for name in ("ffhq128", "celeba64", "shapes16", "tiny16"):
        p, m = pdae_preset(name).model, get_preset(name).model
        assert (p.image_size, p.z_dim, p.unet, p.gradient_unet) == (m.image_size, m.z_dim, m.unet, m.unet)
        assert p.encoder == dataclasses.replace(m.encoder, stochastic=False)
        assert (p.weight_gamma, p.train_shift) == (0.1, "posterior")
    with torch.device("meta"):
        big = PDAE(pdae_preset("ffhq128").model)
    assert 24_000_000 < count_parameters(big.encoder) < 25_500_000
    assert 95_000_000 < count_parameters(big.eps_net) < 106_000_000
    assert 95_000_000 < count_parameters(big.gradient_net) < 106_000_000
