"""The total-correlation penalty (DBAE+TC): the minibatch-weighted estimator against closed
forms, its wiring into the loss, and training with --tc-weight."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dbae.cli.main import main
from dbae.config import TrainConfig, get_preset
from dbae.errors import ConfigError
from dbae.losses import gaussian_total_correlation, total_correlation
from dbae.model import DBAE

# A correlated 3-d Gaussian for the means, and a posterior scale s: then q(z) is the
# Gaussian N(0, A A^T + s^2 I), whose TC has a closed form (0.343 nats here).
A = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.3, -0.5, 0.7]], dtype=torch.float64)
S = 0.5


def gaussian_batch(M: int, mix: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = (torch.randn(M, mix.shape[0], generator=g, dtype=torch.float64) @ mix.T).float()
    sig = torch.full_like(mu, S)
    z = mu + sig * torch.randn(M, mix.shape[0], generator=g, dtype=torch.float64).float()
    return z, mu, sig


def test_gaussian_closed_form():
    assert float(gaussian_total_correlation(torch.diag(torch.tensor([1.0, 4.0, 0.3])))) == pytest.approx(0, abs=1e-6)
    rho = 0.6  # two unit-variance dimensions: TC = -0.5 log(1 - rho^2)
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    assert float(gaussian_total_correlation(cov)) == pytest.approx(-0.5 * math.log(1 - rho**2), rel=1e-12)


def test_estimator_matches_the_closed_form_for_a_large_batch():
    # Measured over 20 batches of M = 2048 (float32): mean 0.342 (exact 0.3426), standard
    # deviation 0.0136 across batches; the bias of including the i = j term is O(1/M).
    # The tolerance 0.05 is about 3.5 standard deviations: a wrong normaliser (log(NM),
    # a missing log M, per-dimension terms summed wrongly) moves the value by >= 0.3.
    exact = float(gaussian_total_correlation(A @ A.T + S**2 * torch.eye(3, dtype=torch.float64)))
    assert exact == pytest.approx(0.3426, abs=1e-3)
    z, mu, sig = gaussian_batch(2048, A, seed=1)
    assert float(total_correlation(z, mu, sig)) == pytest.approx(exact, abs=0.05)


def test_estimator_is_near_zero_for_independent_latents_and_positive_for_correlated_ones():
    z, mu, sig = gaussian_batch(2048, torch.eye(3, dtype=torch.float64), seed=2)
    independent = float(total_correlation(z, mu, sig))
    z, mu, sig = gaussian_batch(2048, A, seed=2)
    correlated = float(total_correlation(z, mu, sig))
    # independent: measured 0.003-0.009 for M = 1024-4096 (the O(1/M) bias is positive)
    assert abs(independent) < 0.03
    assert correlated > 0.25
    # a nearly deterministic copy of one dimension into another: TC is large
    g = torch.Generator().manual_seed(3)
    base = torch.randn(512, 1, generator=g)
    mu = torch.cat([base, base + 0.01 * torch.randn(512, 1, generator=g)], dim=1)
    sig = torch.full_like(mu, 0.05)
    assert float(total_correlation(mu + sig * torch.randn(mu.shape, generator=g), mu, sig)) > 1.0


def test_dataset_size_only_shifts_the_value_never_the_gradient():
    z, mu, sig = gaussian_batch(64, A, seed=4)
    d, N = z.shape[1], 50_000
    grads, values = [], []
    for dataset_size in (None, N):
        zz, mm, ss = (t.clone().requires_grad_(True) for t in (z, mu, sig))
        tc = total_correlation(zz, mm, ss, dataset_size=dataset_size)
        tc.backward()
        values.append(float(tc.detach()))
        grads.append([t.grad for t in (zz, mm, ss)])
    assert values[1] - values[0] == pytest.approx((d - 1) * math.log(N), rel=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_estimator_rejects_bad_shapes():
    z = torch.zeros(4, 3)
    with pytest.raises(ValueError):
        total_correlation(z, z[:, :2], torch.ones(4, 2))
    with pytest.raises(ValueError):
        total_correlation(z[:1], z[:1], torch.ones(1, 3))


def _tiny_model(stochastic: bool = True) -> DBAE:
    config = get_preset("tiny16").model
    if not stochastic:
        from dataclasses import replace

        config = replace(config, encoder=replace(config.encoder, stochastic=False))
    torch.manual_seed(0)
    return DBAE(config)


def test_loss_adds_weighted_tc_and_logs_it():
    model = _tiny_model()
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    plain = model.loss(x, generator=torch.Generator().manual_seed(7))
    with_tc = model.loss(x, generator=torch.Generator().manual_seed(7), tc_weight=0.5)
    assert "tc" not in plain.logs and "tc" in with_tc.logs
    # same draws (z noise, t, bridge noise), so the only difference is 0.5 * TC
    assert float(with_tc.loss.detach()) == pytest.approx(float(plain.loss.detach()) + 0.5 * float(with_tc.logs["tc"]), rel=1e-5)
    with_tc.loss.backward()
    assert model.encoder.head.weight.grad is not None and torch.isfinite(model.encoder.head.weight.grad).all()


def test_tc_needs_the_stochastic_encoder_and_a_nonnegative_weight():
    model = _tiny_model(stochastic=False)
    x = torch.zeros(4, 3, 16, 16)
    with pytest.raises(ConfigError, match="stochastic encoder"):
        model.loss(x, tc_weight=0.1)
    model.loss(x)  # DBAE-d without the penalty is fine
    with pytest.raises(ConfigError, match="tc_weight"):
        TrainConfig(tc_weight=-1.0)
    assert TrainConfig().tc_weight == 0.0  # off by default: existing presets and checkpoints unchanged


def test_training_with_tc_weight_runs_and_logs_it(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny16", "--out", str(out), "--steps", "4", "--log-every", "2",
                 "--ckpt-every", "4", "--sample-every", "100", "--tc-weight", "0.2", "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(math.isfinite(r["tc"]) for r in logged)
    assert json.loads((out / "config.json").read_text())["train"]["tc_weight"] == 0.2
    capsys.readouterr()
