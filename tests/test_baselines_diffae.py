"""The DiffAE baseline (dbae.baselines): DDPM schedule, DDIM sampling/inversion against a
closed-form Gaussian problem, a tiny DiffAE trained on shapes, NFE accounting, checkpoints
and error messages. CPU only; the whole file takes about 20 s on one core."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

from dbae.baselines import (
    DDPMSchedule,
    DiffAE,
    DiffAEConfig,
    ScheduleConfig,
    diffae_preset,
    gaussian_eps,
    load_diffae,
    train_diffae,
)
from dbae.baselines.config import preset_from_dict
from dbae.spacing import diffae_timesteps, pdae_timesteps
from dbae.baselines.train import read_diffae_checkpoint
from dbae.config import EncoderConfig, to_dict
from dbae.data.shapes import ShapesDataset
from dbae.errors import CheckpointError, ConfigError, DataError

# Gaussian toy data x_0 ~ N(M, S^2) per element; its exact eps-predictor is closed form.
M, S = 0.4, 0.3


def _flow_map(x_T: torch.Tensor, ab_T: float) -> torch.Tensor:
    """The exact probability-flow map x_T -> x_0 for Gaussian data: the marginal at level
    ab_T is N(sqrt(ab_T) M, v_T) with v_T = ab_T S^2 + 1 - ab_T, and the ODE maps it
    affinely onto N(M, S^2)."""
    v_T = ab_T * S**2 + 1.0 - ab_T
    return M + S * (x_T - ab_T**0.5 * M) / v_T**0.5


# ----- (2) schedule -----
def test_alphas_bar_closed_form() -> None:
    sched = DDPMSchedule()
    T = 1000
    betas = [1e-4 + (0.02 - 1e-4) * t / (T - 1) for t in range(T)]
    # log abar_t = sum_{s<=t} log(1 - beta_s), accumulated in math.fsum for exactness
    expected = [math.exp(math.fsum(math.log1p(-b) for b in betas[: t + 1])) for t in range(T)]
    got = sched.alphas_bar
    assert got.dtype == torch.float64 and got.shape == (T,)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert sched.betas[0].item() == pytest.approx(1e-4, abs=1e-18)
    assert sched.betas[-1].item() == pytest.approx(0.02, abs=1e-16)
    # DDPM's well-known endpoint values of this schedule
    assert got[0].item() == pytest.approx(0.9999, rel=1e-12)
    assert got[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert bool((got[1:] < got[:-1]).all())


def test_ddim_timesteps_are_the_authors_spacings() -> None:
    """DiffAE's "ddimK" (the first stride with exactly K timesteps 0, s, 2s, ...; T - 1 never
    used) and PDAE's (K + 1 points of int(linspace(0, T - 1, K + 1))), as their READMEs list them."""
    assert diffae_timesteps(1000, 10) == list(range(0, 1000, 100))
    assert diffae_timesteps(1000, 20) == list(range(0, 1000, 50))
    assert diffae_timesteps(1000, 100) == list(range(0, 1000, 10))
    assert diffae_timesteps(1000, 200) == list(range(0, 1000, 5))
    assert diffae_timesteps(1000, 250) == list(range(0, 1000, 4)) and diffae_timesteps(1000, 250)[-1] == 996
    assert diffae_timesteps(1000, 1000) == list(range(1000))
    for impossible in (1, 999):
        with pytest.raises(ConfigError, match="no stride"):
            diffae_timesteps(1000, impossible)
    assert pdae_timesteps(1000, 10) == [0, 99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    ts = pdae_timesteps(1000, 100)
    assert len(ts) == 101 and ts[:4] == [0, 9, 19, 29] and ts[-2:] == [989, 999]


def test_ddim_plans_start_and_end_where_the_authors_do() -> None:
    """DiffAE decodes from abar[t_{K-1}] to abar = 1 and inverts from abar[0] (x_0 taken as the
    state at t = 0) to abar = 0; PDAE decodes from abar[999] to abar[0] (never evaluating t = 0)
    and inverts back; stop_percent p drops the shift from the steps with j - 1 < int(p K)."""
    sched = DDPMSchedule()
    ab = sched.alphas_bar.tolist()
    dec = sched.ddim_plan("diffae", 10)
    assert [s.t for s in dec] == list(range(900, -1, -100))
    assert (dec[0].a, dec[0].a_next, dec[-1].a, dec[-1].a_next) == (ab[900], ab[800], ab[0], 1.0)
    inv = sched.ddim_plan("diffae", 10, invert=True)
    assert [s.t for s in inv] == list(range(0, 1000, 100))
    assert (inv[0].a, inv[0].a_next, inv[-1].a, inv[-1].a_next) == (ab[0], ab[100], ab[900], 0.0)
    dec = sched.ddim_plan("pdae", 10)
    assert [s.t for s in dec] == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert (dec[0].a, dec[-1].a_next) == (ab[999], ab[0])
    inv = sched.ddim_plan("pdae", 10, invert=True)
    assert (inv[0].t, inv[0].a, inv[-1].a_next) == (0, ab[0], ab[999])
    shifted = [s.shift for s in sched.ddim_plan("pdae", 10, stop_percent=0.3)]
    assert shifted == [True] * 7 + [False] * 3  # j = 10 .. 4 shifted, 3 .. 1 not
    with pytest.raises(ConfigError, match="DDIM rule"):
        sched.ddim_plan("ours", 10)


# ----- (1) DDIM against the exact Gaussian eps -----
def test_ddim_sampling_reproduces_gaussian_data() -> None:
    """Decoding with the exact eps (DiffAE's grid): at 1000 steps the samples have mean M and std S.

    x_T is standardized to mean 0 / std 1 exactly (so there is no Monte Carlo error in the
    moments: the map is affine). What remains: (a) x_T ~ N(0, 1) instead of the true marginal
    N(sqrt(ab_T) M, v_T), a mean bias of M S sqrt(ab_T) / sqrt(v_T) ~ 8e-4; (b) DDIM's
    first-order discretization error, about 0.5% of the std at 1000 steps. Tolerance 1%.
    Pointwise, the error against the exact flow map shrinks with the steps."""
    sched = DDPMSchedule()
    eps = gaussian_eps(M, S, sched.alphas_bar)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 1, 2, 2, dtype=torch.float64, generator=g)
    x_T = (x_T - x_T.mean()) / x_T.std()
    out = sched.sample(eps, x_T, 1000)
    assert out.nfe == 1000 and out.x.dtype == torch.float64
    assert abs(out.x.mean().item() - M) < 0.01 * S
    assert abs(out.x.std().item() / S - 1.0) < 0.01

    errs = {}
    for k in (10, 100, 1000):  # each grid starts at its own level abar[t_{K-1}]
        exact = _flow_map(x_T, sched.level(diffae_timesteps(1000, k)[-1]))
        errs[k] = (sched.sample(eps, x_T, k).x - exact).abs().max().item()
    assert errs[10] > errs[100] > errs[1000]
    assert errs[100] / errs[1000] > 5  # first order: 10x fewer steps, ~10x the error
    assert errs[1000] < 0.01


def test_ddim_inversion_then_decoding_reconstructs() -> None:
    """Inversion then decoding with the same number of steps returns the input, up to the
    first-order error of both directions and the ends the authors' grids leave between them
    (DiffAE's inversion takes x_0 at level abar[0], not 1, and ends at abar = 0, where its
    decode starts at abar[t_{K-1}]; PDAE's decode ends at abar[0]). Measured on these points
    (up to 2.5 std from the mean): DiffAE 0.064 at 100 steps and 0.0080 at 1000, PDAE 0.061 and
    0.0065. The error falls more than 5x from 100 to 1000 steps, and stays within 0.015."""
    sched = DDPMSchedule()
    eps = gaussian_eps(M, S, sched.alphas_bar)
    x0 = (M + S * torch.linspace(-2.5, 2.5, 96, dtype=torch.float64)).view(6, 1, 4, 4)
    for rule in ("diffae", "pdae"):
        errs = {}
        for k in (10, 100, 1000):
            inv = sched.invert(eps, x0, k, rule=rule)
            assert inv.nfe == k
            errs[k] = (sched.sample(eps, inv.x, k, rule=rule).x - x0).abs().max().item()
        assert errs[10] > errs[100] > errs[1000], (rule, errs)
        assert errs[100] / errs[1000] > 5, (rule, errs)
        assert errs[1000] < 0.015, (rule, errs)


def test_ddim_step_is_exact_for_the_true_noise() -> None:
    """With eps equal to the noise that made x_t, one DDIM step lands exactly on the
    forward-process point of the same (x_0, eps) at any other level, in either direction;
    its second output is x_0."""
    sched = DDPMSchedule()
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(8, 3, dtype=torch.float64, generator=g) * 2 - 1
    noise = torch.randn(8, 3, dtype=torch.float64, generator=g)
    for t, t_next in ((999, 500), (500, 0), (0, 700), (10, 999)):
        a, b = sched.level(t), sched.level(t_next)
        x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
        got, x0_hat = sched.ddim_step(x_t, noise, a, b, clip=True)  # x0 in [-1, 1]: clipping is inert
        assert torch.allclose(got, b**0.5 * x0 + (1 - b) ** 0.5 * noise, rtol=0, atol=1e-12)
        assert torch.allclose(x0_hat, x0, rtol=0, atol=1e-12)
    # to abar = 1 the step returns x0_hat, to abar = 0 the (re-derived) eps
    a = sched.level(0)
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
    assert torch.allclose(sched.ddim_step(x_t, noise, a, 1.0)[0], x0, atol=1e-12)
    assert torch.allclose(sched.ddim_step(x_t, noise, a, 0.0)[0], noise, atol=1e-10)
    # the clipped step re-derives eps from the clamped x0_hat
    x_t = torch.full((1, 1), 0.9, dtype=torch.float64)
    assert sched.ddim_step(x_t, torch.full_like(x_t, -50.0), sched.level(0), 1.0, clip=True)[0].item() == 1.0


# ----- (3) a tiny DiffAE on shapes -----
TRAIN_STEPS = 120


@pytest.fixture(scope="module")
def trained() -> tuple[DiffAE, list[tuple[int, float]]]:
    preset = diffae_preset("tiny16")
    preset = dataclasses.replace(
        preset, train=dataclasses.replace(preset.train, steps=TRAIN_STEPS, log_every=20, ckpt_every=TRAIN_STEPS)
    )
    data = ShapesDataset(image_size=16, length=10_000, seed=0, split="train")
    result = train_diffae(preset, data, progress=False, log=lambda m: None)
    assert result.step == TRAIN_STEPS and result.path is None
    return result.ema, result.losses


def _test_images(n: int = 16) -> torch.Tensor:
    data = ShapesDataset(image_size=16, length=n, seed=0, split="test")
    return torch.stack([data[i][0] for i in range(n)])


def test_tiny_diffae_trains_and_inferred_x_T_beats_random(trained) -> None:
    """Loss falls from ~0.67 (first 20 steps) to ~0.08 (at 120 steps); reconstruction from the
    DDIM-inverted x_T (MSE ~3e-3 at 20+20 steps, ~6e-4 at 50+50) is far better than decoding
    z_sem from a random x_T (~0.50): the
    information split of DiffAE (x_T carries what z_sem misses) that the DBAE paper
    reports in its Table 2."""
    model, losses = trained
    first, last = losses[0][1], losses[-1][1]
    assert math.isfinite(last) and last < 0.25 * first, losses
    x = _test_images()
    inferred = model.reconstruct(x, 20, 20)
    random = model.reconstruct(x, 20, 20, random_x_T=True, generator=torch.Generator().manual_seed(1))
    mse_inf = (inferred.images - x).square().mean().item()
    mse_rand = (random.images - x).square().mean().item()
    assert mse_inf < 0.1 * mse_rand and mse_inf < 0.02, (mse_inf, mse_rand)
    finer = model.reconstruct(x, 50, 50)
    assert (finer.images - x).square().mean().item() < mse_inf
    assert inferred.images.shape == x.shape and inferred.images.abs().max() <= 1.0
    assert inferred.z.shape == (16, model.config.z_dim)
    # deterministic: the same x gives the same x_T and images
    again = model.reconstruct(x, 20, 20)
    assert torch.equal(again.x_T, inferred.x_T) and torch.equal(again.images, inferred.images)


# ----- (4) NFE accounting -----
class _CountCalls:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def test_nfe_accounting() -> None:
    torch.manual_seed(0)
    model = DiffAE(diffae_preset("tiny8").model).eval()
    unet, encoder = _CountCalls(model.unet), _CountCalls(model.encoder)
    x = torch.rand(2, 3, 8, 8) * 2 - 1

    z = model.encode(x)
    assert (unet.calls, encoder.calls) == (0, 1)
    for steps in (2, 7, 25):  # counts DiffAE's spacing can make (1 it cannot)
        before = unet.calls
        inv = model.infer_x_T(x, z, steps)
        assert inv.nfe == steps == unet.calls - before
        before = unet.calls
        dec = model.decode(z, inv.x_T, steps)
        assert dec.nfe == steps == unet.calls - before
    before, enc_before = unet.calls, encoder.calls
    rec = model.reconstruct(x, 9, 4)
    assert (rec.inversion_nfe, rec.decode_nfe, rec.nfe) == (9, 4, 13) == (9, 4, unet.calls - before)
    assert encoder.calls - enc_before == 1  # z is computed once and reused for the inversion
    before = unet.calls
    rnd = model.reconstruct(x, 9, 4, random_x_T=True)
    assert (rnd.inversion_nfe, rnd.decode_nfe, rnd.nfe) == (0, 4, 4) == (0, 4, unet.calls - before)
    before = unet.calls
    out = model.loss(x)
    assert out.nfe == 1 == unet.calls - before


def test_eps_unet_has_no_endpoint_input() -> None:
    """DiffAE's U-Net sees only the C image channels; the rest of the backbone is DBAE's."""
    from dbae.config import get_preset
    from dbae.nn import ScoreUNet, count_parameters

    cfg = diffae_preset("tiny16").model
    model = DiffAE(cfg)
    assert model.unet.input_blocks[0][0].in_channels == cfg.image_channels
    ref = ScoreUNet(get_preset("tiny16").model.unet, 16, 3, 16)
    # the only difference from DBAE's U-Net: C fewer input channels of the first 3x3 conv
    assert count_parameters(ref) - count_parameters(model.unet) == 3 * cfg.unet.base_channels * 9
    assert not model.encoder.stochastic


# ----- (5) checkpoints and errors -----
def test_checkpoint_round_trip_and_resume(tmp_path) -> None:
    preset = diffae_preset("tiny8")
    preset = dataclasses.replace(
        preset, train=dataclasses.replace(preset.train, steps=4, log_every=1, ckpt_every=2, optimizer="radam")
    )
    data = ShapesDataset(image_size=8, length=64, seed=1, split="train")
    full = train_diffae(preset, data, out=tmp_path / "full", progress=False, log=lambda m: None)
    assert full.path is not None and full.path.name == "step-00000004.safetensors"
    mid = tmp_path / "full" / "checkpoints" / "step-00000002.safetensors"
    assert mid.is_file()

    ckpt = read_diffae_checkpoint(full.path)
    assert ckpt.step == 4 and ckpt.preset == preset and ckpt.optim is not None
    loaded, loaded_preset = load_diffae(full.path)
    assert loaded_preset == preset and not loaded.training
    for (k, a), (k2, b) in zip(full.ema.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    raw, _ = load_diffae(full.path, ema=False)
    for (k, a), b in zip(full.model.state_dict().items(), raw.state_dict().values()):
        assert torch.equal(a, b), k

    # resuming from step 2 gives bit-identical weights to the uninterrupted run
    resumed = train_diffae(preset, data, out=tmp_path / "resumed", resume=mid, progress=False, log=lambda m: None)
    assert [s for s, _ in resumed.losses] == [3, 4]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k

    # the preset survives the JSON round trip (tuples, nested dataclasses, literals)
    assert preset_from_dict(to_dict(preset)) == preset


def test_diffae_trains_in_the_one_loop(tmp_path) -> None:
    """DiffAE is an objective of dbae.training.Trainer: its runs get the loop's checkpoint
    manifest and metrics log, and gradient accumulation gives each micro-batch its share of
    the global batch's t and eps, so two micro-batches follow one batch's trajectory (up to
    float rounding) while train_diffae reproduces the one-batch run bit for bit."""
    from dbae.baselines.objective import BaselineObjective
    from dbae.baselines.train import DIFFAE_FORMAT
    from dbae.checkpoints.manifest import read_manifest
    from dbae.training import TrainOptions, Trainer
    from dbae.training.metrics_log import read_metrics

    preset = diffae_preset("tiny8")
    preset = dataclasses.replace(
        preset, train=dataclasses.replace(preset.train, steps=2, log_every=1, ckpt_every=1, batch_size=8)
    )
    data = ShapesDataset(image_size=8, length=64, seed=1, split="train")

    def run(name: str, accum: int) -> DiffAE:
        torch.manual_seed(preset.train.seed)
        model = DiffAE(preset.model)
        objective = BaselineObjective("DiffAE", model, list(model.parameters()), DiffAE.loss, preset.train, data,
                                      DIFFAE_FORMAT, preset)  # fmt: skip
        Trainer(objective, TrainOptions(out=tmp_path / name, progress=False, eval_images=0, grad_accum=accum,
                                        log=lambda m: None)).fit()  # fmt: skip
        return model

    one, two = run("one", 1), run("two", 2)
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), k
    ckpts = tmp_path / "one" / "checkpoints"
    assert sorted(read_manifest(ckpts)) == ["step-00000001.safetensors", "step-00000002.safetensors"]
    assert [r["step"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")] == [1, 2]
    direct = train_diffae(preset, data, progress=False, log=lambda m: None)
    for (k, a), b in zip(one.state_dict().items(), direct.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no DiffAE checkpoint"):
        load_diffae(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_diffae(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.w": torch.zeros(1)}, str(foreign), metadata={"format": "dbae-checkpoint/1"})
    with pytest.raises(CheckpointError, match="not a DiffAE checkpoint"):
        load_diffae(foreign)


def test_clear_errors() -> None:
    model = DiffAE(diffae_preset("tiny8").model).eval()
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
    with pytest.raises(DataError, match="3 latents for a batch of 2"):
        model.infer_x_T(x, torch.zeros(3, 8), 2)
    for bad in (0, -3, 1001, 2.5, True):
        with pytest.raises(ConfigError, match="steps"):
            model.decode(z, None, bad)
        with pytest.raises(ConfigError, match="steps"):
            model.infer_x_T(x, z, bad)
    with pytest.raises(ConfigError, match="inversion steps"):
        model.reconstruct(x, 0, 2)
    with pytest.raises(ConfigError, match="deterministic"):
        DiffAEConfig(encoder=EncoderConfig(stochastic=True))
    with pytest.raises(ConfigError, match="power of two"):
        DiffAEConfig(image_size=48)
    with pytest.raises(ConfigError, match="betas"):
        ScheduleConfig(beta_start=0.03, beta_end=0.02)
    with pytest.raises(ConfigError, match="unknown DiffAE preset"):
        diffae_preset("imagenet512")
    with pytest.raises(ConfigError, match="optimizer"):
        dataclasses.replace(diffae_preset("tiny8").train, optimizer="sgd")


def test_presets_mirror_dbae_backbones() -> None:
    """Same image size, z_dim, U-Net and encoder layout as the DBAE preset of the same name.
    FFHQ128 sizes: encoder 24.7M (DiffAE: about 25M); U-Net 98.9M (DiffAE's 104M-105M has
    an extra z projection in every residual block, which the shared backbone replaces by a
    single Linear(z) added to the time embedding)."""
    from dbae.config import get_preset
    from dbae.nn import count_parameters

    for name in ("ffhq128", "celeba64", "shapes16", "tiny16"):
        d, m = diffae_preset(name).model, get_preset(name).model
        assert (d.image_size, d.z_dim, d.unet) == (m.image_size, m.z_dim, m.unet)
        assert d.encoder == dataclasses.replace(m.encoder, stochastic=False)
        assert d.schedule == ScheduleConfig(timesteps=1000, beta_start=1e-4, beta_end=0.02)
    with torch.device("meta"):
        big = DiffAE(diffae_preset("ffhq128").model)
    assert 24_000_000 < count_parameters(big.encoder) < 25_500_000
    assert 95_000_000 < count_parameters(big.unet) < 106_000_000
