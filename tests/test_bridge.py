"""Tests of the VP bridge reference math (dbae.bridge): SPEC sections 2-4, 6 and 11.

Everything that is compared against "independent" values derives those values from
the VP forward process directly (Gaussian conditioning, finite differences, SDE
simulation, probability-flow integration), never by re-typing the library formulas.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from dbae.bridge import BridgeConfig, VPBridge, karras_grid

BETA_D, BETA_MIN, T = 2.0, 0.1, 1.0


@pytest.fixture(scope="module")
def bridge() -> VPBridge:
    return VPBridge()


def _f(x) -> float:
    return float(x)


# ---------------------------------------------------------------------------
# SPEC 11: table of checked values
# ---------------------------------------------------------------------------

# Copied verbatim from SPEC.md section 11 (strings, so the printed precision is kept).
SPEC_COLUMNS = ("a", "b", "v", "c_in", "c_skip", "c_out", "lambda", "f", "g2", "c_noise")
SPEC_TABLE = {
    0.01: "0.00095 | 0.99890 | 0.00110 | 1.9978 | 0.9967 | 0.0331 | 911.91 | -0.060 | 0.120 | -1151.3",
    0.3: "0.10384 | 0.88185 | 0.10589 | 1.8167 | 0.7276 | 0.2993 | 11.162 | -0.350 | 0.700 | -301.0",
    0.7: "0.49066 | 0.47270 | 0.26818 | 1.6133 | 0.3076 | 0.4622 | 4.6805 | -0.750 | 1.500 | -89.2",
    0.99: "0.97918 | 0.01808 | 0.02047 | 1.9602 | 0.0174 | 0.4999 | 4.0013 | -1.040 | 2.080 | -2.5",
}


def _library_row(bridge: VPBridge, t: float) -> dict[str, float]:
    a, b, v = bridge.coefficients(t)
    p = bridge.preconditioning(t)
    return {
        "a": _f(a), "b": _f(b), "v": _f(v),
        "c_in": _f(p.c_in), "c_skip": _f(p.c_skip), "c_out": _f(p.c_out),
        "lambda": _f(bridge.loss_weight(t)), "f": _f(bridge.f(t)), "g2": _f(bridge.g2(t)),
        "c_noise": _f(p.c_noise),
    }


@pytest.mark.parametrize("t", sorted(SPEC_TABLE))
def test_spec_table(bridge, t):
    row = _library_row(bridge, t)
    cells = [c.strip() for c in SPEC_TABLE[t].split("|")]
    assert len(cells) == len(SPEC_COLUMNS)
    for name, cell in zip(SPEC_COLUMNS, cells):
        decimals = len(cell.split(".")[1]) if "." in cell else 0
        tol = 0.5 * 10.0 ** (-decimals) * (1 + 1e-9)
        assert abs(row[name] - float(cell)) <= tol, f"t={t} {name}: {row[name]!r} vs SPEC {cell}"


def test_spec_endpoint_values(bridge):
    assert abs(_f(bridge.alpha(T)) - 0.576950) <= 5e-7
    assert abs(_f(bridge.logsnr(T)) - (-0.695228)) <= 5e-7
    # and the schedule identities of SPEC 2: sigma^2 = 1 - s^2, SNR = s^2 / sigma^2
    for t in (1e-3, 0.2, 0.55, 0.97):
        s = _f(bridge.alpha(t))
        assert _f(bridge.sigma2(t)) == pytest.approx(1 - s * s, rel=1e-12)
        assert _f(bridge.logsnr(t)) == pytest.approx(math.log(s * s / (1 - s * s)), rel=1e-10, abs=1e-12)
        assert _f(bridge.log_s(t)) == pytest.approx(math.log(s), rel=1e-13)


# ---------------------------------------------------------------------------
# a, b, v against the Gaussian bridge derived from the VP forward process
# ---------------------------------------------------------------------------


def _bridge_by_conditioning(t: float, dps: int = 40) -> tuple[float, float, float]:
    """a, b, v of x_t | (x0, x_T) by Gaussian conditioning, in high precision.

    Forward process: x_t = s_t x0 + sigma_t n1 (sigma_t^2 = 1 - s_t^2) and
    x_T = (s_T/s_t) x_t + n2 with Var(n2) = s_T^2 (sigt_T^2 - sigt_t^2), sigt^2 = 1/s^2 - 1.
    Given x0: Var(x_t) = sigma_t^2, Cov(x_t, x_T) = (s_T/s_t) sigma_t^2,
    Var(x_T) = (s_T/s_t)^2 sigma_t^2 + s_T^2 (sigt_T^2 - sigt_t^2).
    """
    with mpmath.workdps(dps):
        t = mpmath.mpf(t)
        expo = lambda u: mpmath.mpf(BETA_D) / 2 * u * u + mpmath.mpf(BETA_MIN) * u  # noqa: E731
        s_t, s_T = mpmath.exp(-expo(t) / 2), mpmath.exp(-expo(mpmath.mpf(T)) / 2)
        sigt2_t, sigt2_T = 1 / s_t**2 - 1, 1 / s_T**2 - 1
        var_t = 1 - s_t**2
        cov = (s_T / s_t) * var_t
        var_T = (s_T / s_t) ** 2 * var_t + s_T**2 * (sigt2_T - sigt2_t)
        # E[x_t | x0, x_T] = s_t x0 + cov/var_T (x_T - s_T x0)
        a = cov / var_T
        b = s_t - a * s_T
        v = var_t - cov * cov / var_T
        return float(a), float(b), float(v)


def test_abv_match_gaussian_conditioning(bridge):
    rng = np.random.default_rng(1234)
    ts = np.concatenate([rng.uniform(0.0, T, 150), 10.0 ** rng.uniform(-6, -1, 50), T - 10.0 ** rng.uniform(-6, -1, 50)])
    a, b, v = bridge.coefficients(torch.tensor(ts, dtype=torch.float64))
    assert a.dtype == torch.float64
    for i, t in enumerate(ts):
        ea, eb, ev = _bridge_by_conditioning(float(t))
        assert _f(a[i]) == pytest.approx(ea, rel=1e-10), t
        assert _f(b[i]) == pytest.approx(eb, rel=1e-10), t
        assert _f(v[i]) == pytest.approx(ev, rel=1e-10), t


def test_boundaries(bridge):
    a, b, v = bridge.coefficients(T)
    assert _f(a) == pytest.approx(1.0, abs=1e-15)
    assert abs(_f(b)) <= 1e-15
    assert abs(_f(v)) <= 1e-15
    a, b, v = bridge.coefficients(1e-8)
    assert 0.0 < _f(a) < 1e-8
    assert _f(b) == pytest.approx(1.0, abs=1e-7)
    assert 0.0 < _f(v) < 1e-8
    # t -> 0: v / t tends to beta_min (sigma^2 ~ beta_min t) - accurate thanks to expm1 forms
    assert _f(v) / 1e-8 == pytest.approx(BETA_MIN, rel=1e-5)


def test_finite_and_monotone_in_float64(bridge):
    t = torch.linspace(1e-6, T, 20001, dtype=torch.float64)
    a, b, v = bridge.coefficients(t)
    p = bridge.preconditioning(t)
    lam = bridge.loss_weight(t)
    for name, x in dict(a=a, b=b, v=v, c_in=p.c_in, c_skip=p.c_skip, c_out=p.c_out, c_noise=p.c_noise, lam=lam).items():
        assert torch.isfinite(x).all(), name
    # drift coefficients are only defined on the open interval
    for mode in ("ode", "sde"):
        for k in bridge.drift_coefficients(t[:-1], mode):
            assert torch.isfinite(k).all(), mode
    assert (v[:-1] > 0).all() and (v <= 1).all()
    assert (torch.diff(a) > 0).all(), "a(t) must increase from 0 to 1"
    assert (torch.diff(b) < 0).all(), "b(t) must decrease from 1 to 0"
    assert (a >= 0).all() and (a <= 1).all() and (b >= 0).all() and (b <= 1).all()
    assert (lam > 0).all()


def test_float32_in_float32_out(bridge):
    t32 = torch.tensor([1e-5, 1e-3, 0.05, 0.3, 0.5, 0.7, 0.9, 0.999], dtype=torch.float32)
    t64 = t32.to(torch.float64)
    out32 = list(bridge.coefficients(t32)) + list(bridge.preconditioning(t32)) + [bridge.loss_weight(t32)]
    out64 = list(bridge.coefficients(t64)) + list(bridge.preconditioning(t64)) + [bridge.loss_weight(t64)]
    for x32, x64 in zip(out32, out64):
        assert x32.dtype == torch.float32
        assert x64.dtype == torch.float64
        torch.testing.assert_close(x32.to(torch.float64), x64, rtol=1e-6, atol=0)
    for k32, k64 in zip(bridge.drift_coefficients(t32, "ode"), bridge.drift_coefficients(t64, "ode")):
        assert k32.dtype == torch.float32
        torch.testing.assert_close(k32.to(torch.float64), k64, rtol=1e-6, atol=0)
    # python floats come back as float64 tensors
    assert bridge.coefficients(0.5).a.dtype == torch.float64


# ---------------------------------------------------------------------------
# Monte Carlo: the marginal sampler and the pinned SDE
# ---------------------------------------------------------------------------


def test_marginal_sample_moments(bridge):
    g = torch.Generator().manual_seed(7)
    n = 200_000
    # two different times interleaved in one batch (per-sample t), two pixels per sample
    t = torch.tensor([0.2, 0.85], dtype=torch.float64).repeat(n // 2)
    x0 = torch.tensor([[0.7, -0.4]], dtype=torch.float64).expand(n, 2)
    x_T = torch.tensor([[-1.2, 0.9]], dtype=torch.float64).expand(n, 2)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    xt = bridge.marginal_sample(x0, x_T, t, eps)
    assert xt.shape == (n, 2) and xt.dtype == torch.float64
    for j, tj in enumerate((0.2, 0.85)):
        ea, eb, ev = _bridge_by_conditioning(tj)
        sel = xt[j::2]
        m = len(sel)
        mean, var = sel.mean(0), sel.var(0)
        for k in range(2):
            exp_mean = ea * float(x_T[0, k]) + eb * float(x0[0, k])
            assert abs(float(mean[k]) - exp_mean) < 5 * math.sqrt(ev / m)
            assert abs(float(var[k]) - ev) < 5 * ev * math.sqrt(2 / m)


def _vp_exponent(t):
    return 0.5 * BETA_D * t * t + BETA_MIN * t


def test_marginal_matches_pinned_sde_simulation(bridge):
    """Euler-Maruyama of the Doob h-transform of the VP SDE, pinned at x_T, started at x0."""
    rng = np.random.default_rng(2024)
    x0, xT = 0.7, -1.2
    n_paths, dt = 20_000, 2e-4
    checkpoints = {2500: 0.5, 4500: 0.9}
    s_T = math.exp(-0.5 * _vp_exponent(T))
    sigt2_T = math.expm1(_vp_exponent(T))
    x = np.full(n_paths, x0)
    got = {}
    for i in range(max(checkpoints)):
        t = i * dt
        s_t = math.exp(-0.5 * _vp_exponent(t))
        sigt2_t = math.expm1(_vp_exponent(t))
        beta = BETA_MIN + BETA_D * t
        # p(x_T | x_t = x) = N(r x, V): score wrt x = r (x_T - r x) / V
        r = s_T / s_t
        V = s_T**2 * (sigt2_T - sigt2_t)
        score_h = r * (xT - r * x) / V
        x = x + (-0.5 * beta * x + beta * score_h) * dt + math.sqrt(beta * dt) * rng.standard_normal(n_paths)
        if i + 1 in checkpoints:
            got[checkpoints[i + 1]] = x.copy()
    for t, xs in got.items():
        a, b, v = (_f(c) for c in bridge.coefficients(t))
        mean_err = abs(xs.mean() - (a * xT + b * x0))
        var_err = abs(xs.var() - v)
        assert mean_err < 5 * math.sqrt(v / n_paths) + 2e-3, (t, mean_err)
        assert var_err < 5 * v * math.sqrt(2 / n_paths) + 2e-3 * v, (t, var_err / v)


# ---------------------------------------------------------------------------
# Preconditioning (SPEC 4)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cov", [0.0, 0.15])
def test_preconditioning_exact_moments(cov):
    """Var(c_in x_t) = 1, c_skip = Cov(x0, x_t)/Var(x_t), and the effective target
    (x0 - c_skip x_t) / c_out has unit variance, for (x0, x_T) jointly Gaussian with
    standard deviations sigma_0, sigma_T and covariance cov. Computed with matrix algebra."""
    cfg = BridgeConfig(sigma_0=0.5, sigma_T=0.5, cov=cov)
    br = VPBridge(cfg)
    for t in (0.01, 0.2, 0.5, 0.8, 0.99):
        a, b, v = (_f(c) for c in br.coefficients(t))
        p = br.preconditioning(t)
        c_in, c_skip, c_out = _f(p.c_in), _f(p.c_skip), _f(p.c_out)
        # latent vector (x0, x_T, eps); rows: x0, x_t
        S = np.array([[0.25, cov, 0.0], [cov, 0.25, 0.0], [0.0, 0.0, 1.0]])
        M = np.array([[1.0, 0.0, 0.0], [b, a, math.sqrt(v)]])
        C = M @ S @ M.T
        var_xt, cov_0t, var_0 = C[1, 1], C[0, 1], C[0, 0]
        assert c_in**2 * var_xt == pytest.approx(1.0, rel=1e-12)
        assert c_skip == pytest.approx(cov_0t / var_xt, rel=1e-12)
        target_var = (var_0 - 2 * c_skip * cov_0t + c_skip**2 * var_xt) / c_out**2
        assert target_var == pytest.approx(1.0, rel=1e-10)
        assert _f(br.loss_weight(t)) == pytest.approx(1.0 / c_out**2, rel=1e-12)


def test_preconditioning_monte_carlo(bridge):
    g = torch.Generator().manual_seed(11)
    n = 200_000
    for t in (0.05, 0.5, 0.95):
        x0 = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        x_T = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        eps = torch.randn(n, generator=g, dtype=torch.float64)
        tt = torch.full((n,), t, dtype=torch.float64)
        xt = bridge.marginal_sample(x0, x_T, tt, eps)
        p = bridge.preconditioning(t)
        tol = 5 * math.sqrt(2 / n)  # 5 standard errors of a unit sample variance
        assert abs(float((p.c_in * xt).var()) - 1) < tol
        target = (x0 - p.c_skip * xt) / p.c_out
        assert abs(float(target.var()) - 1) < tol
        # c_skip is the least-squares coefficient: the target is uncorrelated with x_t
        corr = float(torch.corrcoef(torch.stack([target, xt]))[0, 1])
        assert abs(corr) < 5 / math.sqrt(n)
    assert _f(bridge.preconditioning(0.3).c_noise) == pytest.approx(250 * math.log(0.3), rel=1e-14)


# ---------------------------------------------------------------------------
# Drift coefficients and the SDE scalars (SPEC 6 / 11)
# ---------------------------------------------------------------------------


def test_sde_drift_is_vp_reverse_drift(bridge):
    """With w = 1: f x - g^2 (grad_q - grad_h) = f x + g^2 (x - s D)/sigma^2; x_T drops out."""
    rng = np.random.default_rng(5)
    ts = rng.uniform(0.02, 0.98, 64)
    k_x, k_D, k_T, g = bridge.drift_coefficients(torch.tensor(ts), "sde")
    for i, t in enumerate(ts):
        x, D, xT = rng.standard_normal(3)
        beta = BETA_MIN + BETA_D * t
        s = math.exp(-0.5 * _vp_exponent(t))
        sigma2 = -math.expm1(-_vp_exponent(t))
        expected = -0.5 * beta * x + beta * (x - s * D) / sigma2
        got = float(k_x[i]) * x + float(k_D[i]) * D + float(k_T[i]) * xT
        scale = abs(float(k_x[i]) * x) + abs(float(k_D[i]) * D) + abs(expected)
        assert abs(got - expected) <= 1e-10 * scale, t
        assert abs(float(k_T[i])) <= 1e-10 * abs(float(k_x[i]))
        assert float(g[i]) == pytest.approx(math.sqrt(beta), rel=1e-14)


def _rk4_linear(bridge, mode, x, x0, xT, t_from, t_to, n):
    """RK4 of dx/dt = k_x x + k_D x0 + k_T x_T (D = x0 fixed) with library scalars."""
    h = (t_to - t_from) / n
    grid = t_from + h * torch.arange(2 * n + 1, dtype=torch.float64) / 2  # all stage times
    k_x, k_D, k_T, _ = bridge.drift_coefficients(grid, mode)
    F = lambda j, y: k_x[j] * y + k_D[j] * x0 + k_T[j] * xT  # noqa: E731
    for i in range(n):
        j = 2 * i
        k1 = F(j, x)
        k2 = F(j + 1, x + 0.5 * h * k1)
        k3 = F(j + 1, x + 0.5 * h * k2)
        k4 = F(j + 2, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_ode_drift_is_probability_flow(bridge):
    """The ODE with the exact conditional (D = x0) transports the bridge marginal along
    itself: the standardised residual (x - a x_T - b x0)/sqrt(v) is constant in t."""
    g = torch.Generator().manual_seed(3)
    n = 64
    x0 = torch.randn(n, generator=g, dtype=torch.float64).clamp(-1, 1)
    xT = torch.randn(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, generator=g, dtype=torch.float64)

    def at(t, zz):
        a, b, v = bridge.coefficients(t)
        return a * xT + b * x0 + v.sqrt() * zz

    def z_of(t, x):
        a, b, v = bridge.coefficients(t)
        return (x - a * xT - b * x0) / v.sqrt()

    x_end = _rk4_linear(bridge, "ode", at(0.9, z), x0, xT, 0.9, 0.3, 2000)
    torch.testing.assert_close(z_of(0.3, x_end), z, rtol=0, atol=1e-8)
    # the test has teeth: the SDE drift without its noise does not preserve z
    x_sde = _rk4_linear(bridge, "sde", at(0.9, z), x0, xT, 0.9, 0.3, 2000)
    assert (z_of(0.3, x_sde) - z).abs().max() > 0.1


def test_sde_drift_reverses_the_bridge(bridge):
    """Reverse-time Euler-Maruyama with the SDE drift and noise g sqrt|dt| eps, started
    from the bridge marginal at t = 0.9 (D = x0), reproduces the marginal at t = 0.3."""
    g = torch.Generator().manual_seed(9)
    n, steps, t_from, t_to = 20_000, 1000, 0.9, 0.3
    x0, xT = 0.6, -0.8
    a, b, v = (_f(c) for c in bridge.coefficients(t_from))
    x = a * xT + b * x0 + math.sqrt(v) * torch.randn(n, generator=g, dtype=torch.float64)
    h = (t_to - t_from) / steps
    ts = t_from + h * torch.arange(steps, dtype=torch.float64)
    k_x, k_D, k_T, gg = bridge.drift_coefficients(ts, "sde")
    noise = torch.randn(steps, n, generator=g, dtype=torch.float64)
    for i in range(steps):
        x = x + h * (k_x[i] * x + k_D[i] * x0 + k_T[i] * xT) + math.sqrt(abs(h)) * gg[i] * noise[i]
    a, b, v = (_f(c) for c in bridge.coefficients(t_to))
    assert abs(float(x.mean()) - (a * xT + b * x0)) < 5 * math.sqrt(v / n) + 2e-3
    assert abs(float(x.var()) - v) < 5 * v * math.sqrt(2 / n) + 5e-3 * v


def test_f_g2_from_sigt(bridge):
    """SPEC 6: s' = -sigt sigt' s^3, f = s'/s, g^2 = 2 s^2 sigt sigt'; sigt' is the derivative of sigt."""
    ts = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    sigt, sigt_p = bridge.sigt(ts), bridge.sigt_prime(ts)
    s = bridge.alpha(ts)
    torch.testing.assert_close(sigt, torch.sqrt(1 / s**2 - 1), rtol=1e-12, atol=0)
    h = 1e-6
    fd = (bridge.sigt(ts + h) - bridge.sigt(ts - h)) / (2 * h)
    torch.testing.assert_close(sigt_p, fd, rtol=1e-7, atol=0)
    s_prime = -sigt * sigt_p * s**3
    torch.testing.assert_close(bridge.f(ts), s_prime / s, rtol=1e-12, atol=0)
    torch.testing.assert_close(bridge.g2(ts), 2 * s**2 * sigt * sigt_p, rtol=1e-12, atol=0)
    # and the VP SDE identities: f = d log s/dt, d sigma^2/dt = 2 f sigma^2 + g^2
    dlogs = (bridge.log_s(ts + h) - bridge.log_s(ts - h)) / (2 * h)
    torch.testing.assert_close(bridge.f(ts), dlogs, rtol=1e-8, atol=0)
    dsig2 = (bridge.sigma2(ts + h) - bridge.sigma2(ts - h)) / (2 * h)
    torch.testing.assert_close(dsig2, 2 * bridge.f(ts) * bridge.sigma2(ts) + bridge.g2(ts), rtol=1e-8, atol=0)
    torch.testing.assert_close(bridge.drift_coefficients(ts).g, torch.sqrt(bridge.g2(ts)), rtol=1e-14, atol=0)


def test_drift_mode_validation(bridge):
    with pytest.raises(ValueError):
        bridge.drift_coefficients(0.5, "euler")


# ---------------------------------------------------------------------------
# Karras grid (SPEC 6)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5, 10, 40, 100])
def test_karras_grid(n):
    cfg = BridgeConfig()
    ts = karras_grid(n, cfg)
    assert len(ts) == n + 1
    assert all(isinstance(t, float) for t in ts)
    assert all(t1 > t2 for t1, t2 in zip(ts[:-1], ts[1:])), "grid must strictly decrease"
    assert ts[0] == pytest.approx(T - 1e-4, abs=1e-15)
    assert ts[n - 1] == 1e-4
    assert ts[n] == 0.0
    # the grid is uniform in t^(1/7): second differences vanish there
    r = np.array(ts[:-1]) ** (1 / 7)
    np.testing.assert_allclose(np.diff(r), (r[-1] - r[0]) / (n - 1), rtol=1e-9)


def test_karras_grid_midpoint():
    ts = karras_grid(5)
    # i = 2 of 0..4 lies halfway between the endpoints in t^(1/rho)
    mid = ((0.9999 ** (1 / 7) + 1e-4 ** (1 / 7)) / 2) ** 7
    assert ts[2] == pytest.approx(mid, rel=1e-12)
    assert ts[2] == pytest.approx(0.04123223, rel=1e-7)


def test_karras_grid_other_config():
    cfg = BridgeConfig(T=2.0, t_min=1e-3, start_offset=1e-2, rho=3.0)
    ts = karras_grid(4, cfg)
    assert ts[0] == pytest.approx(1.99) and ts[3] == 1e-3 and ts[4] == 0.0
    assert ts[1] == pytest.approx((1.99 ** (1 / 3) * 2 / 3 + 1e-3 ** (1 / 3) / 3) ** 3, rel=1e-12)


def test_karras_grid_edge_cases():
    assert karras_grid(1) == [pytest.approx(T - 1e-4, abs=1e-15), 0.0]
    with pytest.raises(ValueError):
        karras_grid(0)
    with pytest.raises(ValueError):
        karras_grid(-2)
