"""The latent prior (SPEC 7): DDIM sampler, MLP-skip network, training, generation, CLI.

The model tests use the session fixture ``trained_shapes`` (shapes16 networks trained
1000 steps). Everything this file writes goes under pytest's tmp paths: the checkpoint is
copied into a private run directory first (a byte copy, so its SHA-256 is unchanged).

Thresholds (their reasons are next to each assertion):

- latent moments: generated normalized latents (n = 1000) have per-dimension |mean| <= 0.15
  and std in [0.85, 1.15]; pure sampling error is 0.032 (mean) and 0.022 (std) per
  dimension, so this leaves ~4 standard errors plus a small fitting error.
- manifold: the median distance from a generated latent to its nearest training latent is
  at most a quarter of that of a diagonal Gaussian with the data's moments (the shapes
  latents lie near a low-dimensional set; a prior that only matched moments fails).
- not copies: copies of training latents (or of their decoded images) would sit at
  distance ~0 from their nearest training item. Held-out real data gives the yardstick:
  if generated samples follow the data distribution, about 10 % of them fall below the
  10th percentile of the held-out nearest-neighbour distances, and a copying prior puts
  ~100 % there; the test allows at most 30 %, in latent space and in pixel space.
- image statistics (background grey level, shape area, colour saturation, mean shape
  colour): the prior cannot make images closer to the data than the autoencoder does, so
  the generated images are compared with reconstructions of held-out images (same decoder,
  same NFE): standardized mean difference <= 0.35 (pure sampling noise of two groups of
  256 has SD 0.088) and std ratio within [0.7, 1.4]; against the data itself the gap may
  exceed the autoencoder's own gap by at most that margin; and the background levels of
  generated images and reconstructions pass a two-sample Kolmogorov-Smirnov test at
  alpha = 0.001 (D <= 1.95 sqrt(2 / 256) = 0.172).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dbae.cli.main import main
from dbae.data import ShapesDataset
from dbae.errors import CheckpointError, ConfigError, DBAEError
from dbae.checkpoints import resolve_checkpoint
from dbae.inference import load_model
from dbae.prior import (
    AutoencoderRef,
    LatentDiffusion,
    LatentDiffusionConfig,
    LatentInfo,
    LatentSet,
    MLPSkipNet,
    PriorNetConfig,
    check_prior_fits,
    default_latents_path,
    generate,
    get_prior_preset,
    infer_latents,
    load_latents,
    load_prior,
    override_prior,
    save_latents,
    train_prior,
)
from dbae.checkpoints import load_checkpoint, save_checkpoint

#: latents the test prior is trained on (the first items of the training split)
N_TRAIN = 1000
#: generated / held-out images compared
N_IMAGES = 256
#: decoder budget for every image in this file
NFE = 5
PRIOR_STEPS = 1000
DDIM_STEPS = 50


# ----- the DDIM sampler and the network on known quantities -----
def _gaussian_eps(diffusion: LatentDiffusion, m: torch.Tensor, s: torch.Tensor):
    """The exact noise predictor E[eps | x_t] for data x_0 ~ N(m, diag(s^2))."""
    ab_all = diffusion.alphas_bar

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = ab_all[t].to(x.dtype)[:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * s**2 + 1 - ab)

    return eps


GAUSS_M = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64)
GAUSS_S = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64)


def test_ddim_with_the_exact_denoiser_converges_to_the_gaussian() -> None:
    """All T steps of deterministic DDIM with the exact noise predictor: the data's mean,
    and its std up to the last step's shrinkage. That step returns E[x_0 | x_0 noised at
    t = 0] (abar_0 = 0.992), whose std is s sqrt(abar_0 s^2 / (abar_0 s^2 + 1 - abar_0)):
    0.2 % below s for the unit-scale normalized latents, 26 % below for s = 0.1."""
    diffusion = LatentDiffusion(LatentDiffusionConfig(timesteps=1000, beta=0.008))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(10_000, 4, generator=g, dtype=torch.float64)
    x = diffusion.sample(_gaussian_eps(diffusion, GAUSS_M, GAUSS_S), noise, 1000)
    ab0 = float(diffusion.alphas_bar[0])
    expected_std = GAUSS_S * torch.sqrt(ab0 * GAUSS_S**2 / (ab0 * GAUSS_S**2 + 1 - ab0))
    # sampling error of n = 10000: mean s / 100, std s / 141; the start N(0, I) is off
    # from the true x_T marginal by sqrt(abar_T) m = 0.018 m, shrunk by the flow to ~0.018 m s
    torch.testing.assert_close(x.mean(0), GAUSS_M, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), expected_std, atol=0, rtol=0.03)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_few_steps_matches_its_exact_gaussian_moments(eta: float) -> None:
    """With Gaussian data and the exact predictor every DDIM step is affine in x (plus
    noise sigma z for eta > 0), so the output's mean and variance follow in closed form
    from the update formulas; the sampler's Monte Carlo moments must agree with them."""
    diffusion = LatentDiffusion(LatentDiffusionConfig(timesteps=1000, beta=0.008))
    eps_fn = _gaussian_eps(diffusion, GAUSS_M, GAUSS_S)
    ts = diffusion.ddim_timesteps(20)
    assert len(ts) == 20
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for t, prev in zip(ts, ts[1:] + [-1]):
        a_t = float(diffusion.alphas_bar[t])
        a_p = float(diffusion.alphas_bar[prev]) if prev >= 0 else 1.0
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))

        def step(x: torch.Tensor) -> torch.Tensor:  # the noiseless part of one update
            e = eps_fn(x[None], torch.tensor([t]))[0]
            x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
            return math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sigma**2, 0.0)) * e

        offset = step(torch.zeros(4, dtype=torch.float64))
        slope = step(torch.ones(4, dtype=torch.float64)) - offset
        mean, var = slope * mean + offset, slope**2 * var + sigma**2
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    x = diffusion.sample(eps_fn, noise, 20, eta=eta, generator=g)
    std = var.sqrt()
    # Monte Carlo error of n = 20000: 0.7 % of std for the mean, 0.5 % for the std
    torch.testing.assert_close(x.mean(0), mean, atol=float(4 * std.max() / 141), rtol=0)
    torch.testing.assert_close(x.std(0), std, atol=0, rtol=0.025)
    if eta == 0.0:  # 20 DDIM steps visibly under-disperse this Gaussian: the check has teeth
        assert (std[:3] < 0.95 * GAUSS_S[:3]).all()


def test_ddim_timesteps_and_schedule() -> None:
    diffusion = LatentDiffusion(LatentDiffusionConfig(timesteps=1000, beta=0.008))
    assert diffusion.ddim_timesteps(1) == [999]
    ts = diffusion.ddim_timesteps(10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and ts == sorted(ts, reverse=True)
    assert len(diffusion.ddim_timesteps(1000)) == 1000
    for bad in (0, 1001):
        with pytest.raises(ConfigError):
            diffusion.ddim_timesteps(bad)
    # abar_t = (1 - beta)^(t + 1): about 3.2e-4 at t = 999, so x_T is nearly pure noise
    assert math.isclose(float(diffusion.alphas_bar[999]), 0.992**1000, rel_tol=1e-12)
    x0 = torch.full((4, 3), 2.0)
    eps = torch.ones(4, 3)
    t = torch.tensor([0, 10, 500, 999])
    ab = diffusion.alphas_bar[t].float()[:, None]
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), (ab.sqrt() * 2 + (1 - ab).sqrt()).expand(4, 3))


def test_mlp_skip_net_sizes_and_conditioning() -> None:
    """Paper size (10 layers of 2048, z 512): z_t re-enters every layer after the first,
    and every hidden layer has its own time-conditioned scale and LayerNorm."""
    cfg = get_prior_preset("ffhq128").net
    net = MLPSkipNet(cfg, 512)
    w, d, e = cfg.width, 512, cfg.time_embed_dim
    layer = lambda fan_in: fan_in * w + w + (e * w + w) + 2 * w  # noqa: E731  linear, time scale, LayerNorm
    expected = (
        (cfg.time_channels * e + e + e * e + e)  # time embedding MLP
        + layer(d) + (cfg.num_layers - 2) * layer(w + d)
        + (w + d) * d + d  # output layer
    )
    assert sum(p.numel() for p in net.parameters()) == expected
    small = MLPSkipNet(PriorNetConfig(num_layers=3, width=32, time_channels=16, time_embed_dim=16), 8)
    torch.manual_seed(0)
    for p in small.parameters():  # non-zero everywhere, so every path shows
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(5, 8)
    out0, out1 = small(z, torch.zeros(5)), small(z, torch.full((5,), 500.0))
    assert out0.shape == (5, 8) and not torch.allclose(out0, out1)
    with pytest.raises(ValueError):
        small(torch.randn(5, 7), torch.zeros(5))


def test_prior_presets() -> None:
    for name, layers, batch in (("celeba64", 10, 512), ("celeba64-deep", 15, 512), ("ffhq128", 10, 256)):
        p = get_prior_preset(name)
        assert (p.net.num_layers, p.net.width, p.train.batch_size) == (layers, 2048, batch)
        assert (p.diffusion.timesteps, p.diffusion.beta) == (1000, 0.008)
        assert (p.train.lr, p.train.weight_decay) == (1e-4, 0.01)
        assert p.train.steps * p.train.batch_size == pytest.approx(600e6, rel=1e-3)  # 600M latents seen
    with pytest.raises(ConfigError):
        get_prior_preset("nope")
    with pytest.raises(ConfigError):
        LatentDiffusionConfig(loss="l3")


# ----- a tiny prior on the shapes autoencoder -----
def _image_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image statistics measured on pixels (images (B, 3, H, W) in [-1, 1]): the grey
    level of the background (median over pixels; shapes cover < 30 % of an image), the
    shape's area fraction (pixels whose channel spread exceeds 0.3: the background is
    grey, spread 0, every palette colour has spread >= 0.65), the mean colour spread
    (saturation mass) and the spread-weighted mean colour of each channel."""
    im = (images.float() + 1) / 2
    background = im.mean(1).flatten(1).median(1).values
    spread = im.amax(1) - im.amin(1)
    area = (spread > 0.3).float().mean((1, 2))
    weight = spread[:, None] + 1e-6
    colour = (im * weight).sum((2, 3)) / weight.sum((2, 3))
    return {"background": background, "area": area, "saturation": spread.mean((1, 2)),
            "red": colour[:, 0], "green": colour[:, 1], "blue": colour[:, 2]}


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact pairwise Euclidean distances (no matrix-product shortcut: a copy is at 0)."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def _ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    grid = torch.cat([a, b]).sort().values
    cdf = lambda v: torch.searchsorted(v.sort().values, grid, right=True).double() / len(v)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


def _mismatches(stats: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    """The statistics whose distribution differs from the reference's: standardized mean
    difference > 0.35, std ratio outside [0.7, 1.4], or (background level) a two-sample
    KS statistic above the alpha = 0.001 critical value for 256 + 256 samples."""
    bad = []
    for key, a in stats.items():
        r = reference[key]
        pooled = float(torch.sqrt((a.var() + r.var()) / 2)) + 1e-4
        if abs(float(a.mean() - r.mean())) / pooled > 0.35:
            bad.append(f"{key}: mean {float(a.mean()):.4f} vs {float(r.mean()):.4f} (pooled std {pooled:.4f})")
        ratio = (float(a.std()) + 1e-4) / (float(r.std()) + 1e-4)
        if not 0.7 <= ratio <= 1.4:
            bad.append(f"{key}: std ratio {ratio:.3f}")
    ks = _ks_statistic(stats["background"], reference["background"])
    if ks > 1.95 * math.sqrt(2 / N_IMAGES):
        bad.append(f"background: KS statistic {ks:.3f}")
    return bad


@pytest.fixture(scope="module")
def run_copy(trained_shapes: Path, tmp_path_factory) -> Path:
    """A private run directory holding a byte copy of the shared checkpoint."""
    src = resolve_checkpoint(trained_shapes)
    run = tmp_path_factory.mktemp("prior_run")
    (run / "checkpoints").mkdir()
    shutil.copy2(src, run / "checkpoints" / src.name)
    return run


@pytest.fixture(scope="module")
def setup(run_copy: Path, tmp_path_factory) -> dict:
    """Latents of the first N_TRAIN training images and of N_IMAGES held-out images, and a
    prior trained on the former (tiny preset, PRIOR_STEPS steps, seeded)."""
    torch.manual_seed(0)
    loaded = load_model(run_copy)
    model = loaded.model
    train_set = ShapesDataset(16, seed=0, split="train")
    test_set = ShapesDataset(16, seed=0, split="test")
    z_train = infer_latents(model, train_set, N_TRAIN, progress=False)
    z_test = infer_latents(model, test_set, N_IMAGES, progress=False)
    ref = AutoencoderRef.of(loaded.path, ema=True, step=loaded.step, preset=loaded.preset.name,
                            z_dim=model.config.z_dim)
    latents = LatentSet.from_latents(z_train, LatentInfo(ref, "shapes", "train", 0, N_TRAIN, False))
    preset = override_prior(get_prior_preset("tiny"), steps=PRIOR_STEPS)
    out = tmp_path_factory.mktemp("prior")
    result = train_prior(latents, preset, out, progress=False, log=lambda m: None)
    return {"loaded": loaded, "model": model, "ref": ref, "latents": latents, "z_test": z_test,
            "train_set": train_set, "test_set": test_set, "result": result, "prior": load_prior(out)}


def test_prior_loss_falls(setup: dict) -> None:
    losses = [loss for _, loss in setup["result"].losses]
    # untrained, the eps prediction is noise-sized (L2 loss ~ 0.2 on the first 50 steps);
    # a working fit brings it well below half of that
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(math.isfinite(v) for v in losses)


def test_generated_latents_match_the_data_latents(setup: dict) -> None:
    latents: LatentSet = setup["latents"]
    g = torch.Generator().manual_seed(1)
    z = setup["prior"].sample(1000, DDIM_STEPS, generator=g)
    zn = latents.normalize(z)
    assert zn.mean(0).abs().max() <= 0.15, zn.mean(0)
    assert ((zn.std(0) - 1).abs() <= 0.15).all(), zn.std(0)

    train_n = latents.normalize(latents.z)
    nn = lambda a: _cdist(a, train_n).min(1).values  # noqa: E731
    gaussian = torch.randn(1000, latents.z_dim, generator=g)  # the data's moments, nothing more
    assert nn(zn).median() <= 0.25 * nn(gaussian).median(), (nn(zn).median(), nn(gaussian).median())

    held_out = nn(latents.normalize(setup["z_test"]))
    q10 = held_out.quantile(0.10)
    assert float((nn(zn) < q10).float().mean()) <= 0.30
    # the criterion catches copies: training latents themselves all sit below it
    assert float((nn(train_n[:200]) < q10).float().mean()) == 1.0


def test_generated_images_are_new_and_look_like_the_data(setup: dict) -> None:
    model, latents = setup["model"], setup["latents"]
    g = torch.Generator().manual_seed(2)
    gen = generate(model, setup["prior"], N_IMAGES, nfe=NFE, prior_steps=DDIM_STEPS, batch_size=128, generator=g)
    assert gen.images.shape == (N_IMAGES, 3, 16, 16) and gen.nfe == NFE
    assert gen.images.min() >= -1 and gen.images.max() <= 1

    x_test = torch.stack([setup["test_set"][i][0] for i in range(N_IMAGES)])
    with torch.no_grad():
        recon = torch.cat([model.decode(z, NFE).images for z in setup["z_test"].split(128)])
        # the decoded training latents: what a prior that copies its training set would output
        copies = torch.cat([model.decode(z, NFE).images for z in latents.z.split(250)])

    # not copies (pixel space): nearest decoded training latent, per-pixel RMS distance
    def nn(images: torch.Tensor) -> torch.Tensor:
        return _cdist(images.flatten(1), copies.flatten(1)).min(1).values / math.sqrt(images[0].numel())

    q10 = nn(recon).quantile(0.10)  # held-out data through the same decoder
    assert q10 > 0
    assert float((nn(gen.images) < q10).float().mean()) <= 0.30
    assert float(nn(copies[:64]).max()) == 0.0  # the yardstick's copy case sits at 0

    # pixel statistics: generated vs reconstructions (the autoencoder's reach) and vs data
    s_gen, s_rec, s_data = _image_stats(gen.images), _image_stats(recon), _image_stats(x_test)
    assert _mismatches(s_gen, s_rec) == []
    for key in s_gen:
        a, r, d = s_gen[key], s_rec[key], s_data[key]
        spread = float(d.std()) + 1e-4
        ae_gap = abs(float(r.mean() - d.mean())) / spread
        assert abs(float(a.mean() - d.mean())) / spread <= ae_gap + 0.35, (key, a.mean(), d.mean(), r.mean())
    # the criterion has teeth: latents drawn from N(0, I) without undoing the normalization
    # (a classic prior bug) give images that fail it
    with torch.no_grad():
        wrong = model.decode(torch.randn(N_IMAGES, latents.z_dim, generator=g), NFE).images
    assert _mismatches(_image_stats(wrong), s_rec) != []


def test_sde_decoding_differs_but_keeps_the_statistics(setup: dict) -> None:
    model, prior = setup["model"], setup["prior"]
    ode = generate(model, prior, 64, nfe=NFE, prior_steps=20, generator=torch.Generator().manual_seed(3))
    sde = generate(model, prior, 64, nfe=2 * NFE, prior_steps=20, churn=0.33,
                   generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sde.z, ode.z)  # same prior draws: only the decoding differs
    assert not torch.allclose(sde.images, ode.images)
    bg_ode, bg_sde = _image_stats(ode.images)["background"], _image_stats(sde.images)["background"]
    # the background level is fixed by z (through x_T): stochastic decoding keeps it
    assert float((bg_ode - bg_sde).abs().median()) < 0.05


# ----- errors -----
def test_bad_inputs_give_clear_errors(setup: dict, run_copy: Path, tmp_path: Path) -> None:
    ckpt = setup["loaded"].path
    with pytest.raises(CheckpointError, match="infer-latents"):
        load_latents(tmp_path / "missing.latents.safetensors", checkpoint_hint=str(ckpt))
    garbage = tmp_path / "garbage.latents.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_latents(garbage)

    # another autoencoder: same architecture, other weights, so another file hash
    other = tmp_path / "other" / "checkpoints" / ckpt.name
    state = load_checkpoint(ckpt, with_optimizer=False)
    save_checkpoint(other, preset=state.preset, step=state.step + 1, model=state.model,
                    ema={k: v + 0.01 for k, v in state.ema.items()})
    other_model = load_model(other)
    other_ref = AutoencoderRef.of(other, ema=True, step=other_model.step, preset=other_model.preset.name,
                                  z_dim=other_model.model.config.z_dim)
    with pytest.raises(CheckpointError, match="another autoencoder"):
        check_prior_fits(setup["prior"], other_model.model, other_ref)
    raw_ref = AutoencoderRef.of(ckpt, ema=False, step=setup["ref"].step, preset=setup["ref"].preset,
                                z_dim=setup["ref"].z_dim)
    with pytest.raises(CheckpointError, match="raw weights"):
        check_prior_fits(setup["prior"], setup["model"], raw_ref)
    assert issubclass(CheckpointError, DBAEError)


# ----- command line, end to end -----
def test_cli_infer_train_generate(run_copy: Path, tmp_path: Path, capsys) -> None:
    ckpt = resolve_checkpoint(run_copy)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy2(ckpt, run / "checkpoints" / ckpt.name)
    ck = str(run / "checkpoints" / ckpt.name)

    # generate and train-prior before infer-latents: clear errors, exit code 2
    assert main(["train-prior", "--ckpt", str(run), "--no-progress"]) == 2
    assert "dbae infer-latents" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(run), "--out", str(tmp_path / "g0"), "--no-progress"]) == 2
    assert "no prior" in capsys.readouterr().err
    # a bad prior step count is refused before any work (the model is not even loaded)
    assert main(["generate", "--ckpt", str(tmp_path / "nowhere"), "--prior-steps", "0", "--out", str(tmp_path / "g0")]) == 2
    assert "--prior-steps must be at least 1" in capsys.readouterr().err

    assert main(["infer-latents", "--ckpt", str(run), "--n", "300", "--device", "cpu", "--no-progress"]) == 0
    lat = default_latents_path(Path(ck))
    assert lat.is_file() and lat.with_suffix(".json").is_file()
    stored = load_file(str(lat))
    assert stored["z"].shape == (300, 16)
    torch.testing.assert_close(stored["std"], stored["z"].double().std(0).float())

    assert main(["train-prior", "--ckpt", str(run), "--preset", "tiny", "--steps", "100",
                 "--device", "cpu", "--no-progress"]) == 0
    prior_dir = run / "prior"
    assert (prior_dir / "prior.safetensors").is_file() and (prior_dir / "prior.json").is_file()
    assert (prior_dir / "metrics.jsonl").read_text().count("\n") == 2  # log_every 50
    assert main(["train-prior", "--ckpt", str(run), "--steps", "10", "--no-progress"]) == 2  # exists: --force
    assert "--force" in capsys.readouterr().err

    out = tmp_path / "gen"
    argv = ["generate", "--ckpt", str(run), "--n", "10", "--nfe", "6", "--sampler", "heun", "--churn", "0.2",
            "--prior-steps", "10", "--seed", "5", "--batch-size", "4", "--out", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    assert (out / "grid.png").is_file() and (out / "generate.json").is_file()
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(10)]
    samples = np.load(out / "samples.npy")
    assert samples.shape == (10, 16, 16, 3) and samples.dtype == np.uint8
    assert np.load(out / "z.npy").shape == (10, 16)
    first = samples.copy()
    assert main(argv) == 0  # seeded: the same images again
    np.testing.assert_array_equal(np.load(out / "samples.npy"), first)

    # latents and prior of another autoencoder: refused
    other = tmp_path / "other"
    state = load_checkpoint(Path(ck), with_optimizer=False)
    save_checkpoint(other / "checkpoints" / ckpt.name, preset=state.preset, step=state.step, model=state.model,
                    ema={k: v * 1.01 for k, v in state.ema.items()})
    capsys.readouterr()
    assert main(["train-prior", "--ckpt", str(other), "--latents", str(lat), "--out", str(tmp_path / "p2"),
                 "--no-progress"]) == 2
    assert "another autoencoder" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(other), "--prior", str(prior_dir), "--out", str(tmp_path / "g2"),
                 "--no-progress"]) == 2
    assert "another autoencoder" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(run), "--raw-weights", "--out", str(tmp_path / "g3"),
                 "--no-progress"]) == 2
    assert "raw-weights" in capsys.readouterr().err


def test_latents_round_trip(tmp_path: Path) -> None:
    ref = AutoencoderRef("ab" * 32, "ema", "x.safetensors", 3, "tiny16", 4)
    z = torch.randn(50, 4) * torch.tensor([1.0, 2.0, 0.5, 0.0]) + 3  # last dimension constant
    latents = LatentSet.from_latents(z, LatentInfo(ref, "shapes", "train", 0, 50, False))
    assert torch.isfinite(latents.normalize(z)).all()  # a dead dimension normalizes to 0
    torch.testing.assert_close(latents.denormalize(latents.normalize(z)), z)
    path = save_latents(tmp_path / "l.latents.safetensors", latents)
    back = load_latents(path)
    torch.testing.assert_close(back.z, latents.z)
    assert back.info == latents.info
    with pytest.raises(Exception):
        LatentSet.from_latents(torch.randn(1, 4), latents.info)
