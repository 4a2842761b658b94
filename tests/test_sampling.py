"""Tests of the bridge samplers (dbae.sampling): SPEC sections 6 and 11."""

from __future__ import annotations

import math

import pytest
import torch

from dbae import _ext
from dbae.bridge import VPBridge, karras_grid
from dbae.sampling import BridgeSampler, drift, nfe_for, steps_for_nfe, StepScalars

T0 = 1.0 - 1e-4


@pytest.fixture(scope="module")
def sampler() -> BridgeSampler:
    return BridgeSampler()


@pytest.fixture(scope="module")
def toy():
    """Data that is a deterministic function of x_T: the exact denoiser is D = x0."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    return x_T, torch.tanh(2 * x_T)


class Recorder:
    """Denoiser wrapper that records every call (x, t)."""

    def __init__(self, fn):
        self.fn = fn
        self.ts: list[float] = []
        self.xs: list[torch.Tensor] = []
        self.ds: list[torch.Tensor] = []

    def __call__(self, x, t):
        assert isinstance(t, float)
        self.ts.append(t)
        self.xs.append(x.clone())
        d = self.fn(x, t)
        self.ds.append(d.clone())
        return d


# ---------------------------------------------------------------------------
# Accuracy on a problem with a known exact denoiser
# ---------------------------------------------------------------------------


def test_euler_ode_converges_to_x0(sampler, toy):
    x_T, x0 = toy
    errs = []
    for steps in (5, 10, 20, 50, 100):
        out = sampler.sample(lambda x, t: x0, x_T, steps=steps, sampler="euler")
        assert out.images.shape == x_T.shape and out.images.dtype == torch.float64
        assert out.steps == steps and out.nfe == steps
        errs.append(float((out.images - x0).abs().max()))
    assert all(e1 > e2 for e1, e2 in zip(errs[:-1], errs[1:])), errs
    assert errs[-1] < 1e-3, errs
    assert errs[0] < 1e-2, errs
    # the start point is far from x0: the sampler really moved the state
    assert float((x_T - x0).abs().max()) > 1.0


@pytest.mark.parametrize("steps", [20, 50])
def test_heun_ode_converges_to_x0(sampler, toy, steps):
    x_T, x0 = toy
    out = sampler.sample(lambda x, t: x0, x_T, steps=steps, sampler="heun")
    assert float((out.images - x0).abs().max()) < 1e-3


@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
def test_churn_with_exact_denoiser_lands_on_x0(sampler, toy, sampler_name):
    # the SDE sub-steps add noise, but every trajectory of the exact conditional ends at x0
    x_T, x0 = toy
    g = torch.Generator().manual_seed(1)
    out = sampler.sample(lambda x, t: x0, x_T, steps=30, sampler=sampler_name, churn=0.33, generator=g)
    assert float((out.images - x0).abs().max()) < 1e-2


def test_float32_state_stays_float32(sampler, toy):
    x_T, x0 = toy
    out = sampler.sample(lambda x, t: x0.float(), x_T.float(), steps=50, sampler="euler")
    assert out.images.dtype == torch.float32
    assert float((out.images.double() - x0).abs().max()) < 2e-3


def test_state_dependent_gaussian_denoiser():
    """x0 | x_T ~ N(c x_T, tau^2) elementwise: the exact denoiser depends on x and t,
    E[x0 | x_t, x_T] = c x_T + b tau^2 / (b^2 tau^2 + v) (x_t - (a + b c) x_T).
    The probability flow keeps the standardised residual, so the ODE from x_T at t_0
    ends at c x_T + tau z_0 with z_0 = (x_T - (a + b c) x_T) / sqrt(b^2 tau^2 + v) at t_0."""
    br = VPBridge()
    smp = BridgeSampler(br)
    c, tau = 0.6, 0.3
    x_T = torch.linspace(-2, 2, 9, dtype=torch.float64).view(1, 1, 3, 3)

    def den(x, t):
        a, b, v = (float(u) for u in br.coefficients(t))
        return c * x_T + b * tau**2 / (b * b * tau**2 + v) * (x - (a + b * c) * x_T)

    a, b, v = (float(u) for u in br.coefficients(T0))
    exact = c * x_T + tau * (x_T - (a + b * c) * x_T) / math.sqrt(b * b * tau**2 + v)
    rec = Recorder(den)
    out = smp.sample(rec, x_T, steps=100, sampler="euler")
    assert rec.ts == karras_grid(100)[:-1]
    assert torch.equal(rec.xs[0], x_T)  # the first evaluation is at the start point
    # sampler discretisation error (dominated by the first, large step next to T)
    assert float((out.images - exact).abs().max()) < 0.06
    heun = smp.sample(den, x_T, steps=100, sampler="heun")
    assert float((heun.images - exact).abs().max()) < 0.06


# ---------------------------------------------------------------------------
# NFE accounting, evaluation times, Heun structure
# ---------------------------------------------------------------------------


def _expected_nfe(steps, sampler_name, churn):
    if sampler_name == "euler":
        return 2 * steps if churn > 0 else steps
    return 2 * (steps - 1) + 1 + (steps if churn > 0 else 0)


@pytest.mark.parametrize("churn", [0.0, 0.33])
@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6])
def test_nfe_equals_calls(sampler, sampler_name, churn, steps):
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    rec = Recorder(lambda x, t: torch.tanh(x) * (1 - t))  # depends on x and t
    out = sampler.sample(rec, x_T, steps=steps, sampler=sampler_name, churn=churn,
                         generator=torch.Generator().manual_seed(0))
    assert len(rec.ts) == out.nfe == nfe_for(steps, sampler_name, churn) == _expected_nfe(steps, sampler_name, churn)
    assert torch.isfinite(out.images).all()
    assert all(x.shape == x_T.shape for x in rec.xs)

    grid = karras_grid(steps)
    t_hat = [t + churn * (tn - t) for t, tn in zip(grid[:-1], grid[1:])]
    expected_ts = []
    for i in range(steps):
        if churn > 0:
            expected_ts += [grid[i], t_hat[i]]
        else:
            expected_ts += [grid[i]]
        if sampler_name == "heun" and i < steps - 1:
            expected_ts.append(grid[i + 1])  # corrector evaluation; none at t = 0
    assert rec.ts == pytest.approx(expected_ts, rel=1e-15, abs=0)
    assert min(rec.ts) > 0.0
    if churn > 0:
        for i in range(steps):
            assert grid[i + 1] < t_hat[i] < grid[i]


def test_nfe_for_values():
    assert [nfe_for(n, "euler", 0.0) for n in (1, 2, 10, 100)] == [1, 2, 10, 100]
    assert [nfe_for(n, "euler", 0.5) for n in (1, 2, 10)] == [2, 4, 20]
    assert [nfe_for(n, "heun", 0.0) for n in (1, 2, 10)] == [1, 3, 19]
    assert [nfe_for(n, "heun", 0.33) for n in (1, 2, 10)] == [2, 5, 29]
    with pytest.raises(ValueError):
        nfe_for(0, "euler", 0.0)


@pytest.mark.parametrize("churn", [0.0, 0.33])
@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
def test_steps_for_nfe(sampler_name, churn):
    smallest = _expected_nfe(1, sampler_name, churn)
    for budget in range(smallest, 80):
        n = steps_for_nfe(budget, sampler_name, churn)
        assert _expected_nfe(n, sampler_name, churn) <= budget < _expected_nfe(n + 1, sampler_name, churn)
    for budget in range(-1, smallest):
        with pytest.raises(ValueError):
            steps_for_nfe(budget, sampler_name, churn)


def test_steps_for_nfe_examples():
    assert steps_for_nfe(100, "euler", 0.0) == 100
    assert steps_for_nfe(100, "euler", 0.33) == 50
    assert steps_for_nfe(100, "heun", 0.0) == 50  # 2*49+1 = 99
    assert steps_for_nfe(20, "heun", 0.0) == 10  # 19
    assert steps_for_nfe(100, "heun", 0.33) == 33  # 65 + 33 = 98
    with pytest.raises(ValueError):
        steps_for_nfe(10, "dpm", 0.0)


def test_heun_structure_matches_spec(sampler):
    """Predictor-corrector per SPEC 6, checked against the reference (VPBridge) scalars;
    the sampler itself takes its scalars from the C++ extension when it is built."""
    br = VPBridge()
    x_T = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rec = Recorder(lambda x, t: torch.sin(3 * x) * (0.5 + t))
    steps = 6
    out = sampler.sample(rec, x_T, steps=steps, sampler="heun")
    grid = karras_grid(steps)

    def d_ref(x, D, t):
        k = br.drift_coefficients(t, "ode")
        return float(k.k_x) * x + float(k.k_D) * D + float(k.k_T) * x_T

    j = 0
    x = x_T
    for i in range(steps):
        dt = grid[i + 1] - grid[i]
        torch.testing.assert_close(rec.xs[j], x, rtol=1e-12, atol=1e-12)
        d1 = d_ref(x, rec.ds[j], grid[i])
        j += 1
        if i < steps - 1:
            torch.testing.assert_close(rec.xs[j], x + dt * d1, rtol=1e-12, atol=1e-12)  # predictor
            d2 = d_ref(rec.xs[j], rec.ds[j], grid[i + 1])
            j += 1
            x = x + dt * 0.5 * (d1 + d2)
        else:
            x = x + dt * d1  # last step to t = 0 is plain Euler
    assert j == len(rec.ts)
    torch.testing.assert_close(out.images, x, rtol=1e-12, atol=1e-12)


def test_one_step_heun_is_euler(sampler, toy):
    x_T, x0 = toy
    den = lambda x, t: torch.tanh(x) * t  # noqa: E731
    e = sampler.sample(den, x_T, steps=1, sampler="euler").images
    h = sampler.sample(den, x_T, steps=1, sampler="heun").images
    assert torch.equal(e, h)
    assert not torch.equal(
        sampler.sample(den, x_T, steps=3, sampler="euler").images,
        sampler.sample(den, x_T, steps=3, sampler="heun").images,
    )


def test_drift_helper():
    g = torch.Generator().manual_seed(2)
    x, D, xT = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3))
    k = StepScalars(k_x=2.0, k_D=-3.0, k_T=0.5, g=1.0)
    torch.testing.assert_close(drift(x, D, xT, k), 2 * x - 3 * D + 0.5 * xT, rtol=1e-14, atol=1e-14)
    # the noise scale g does not enter the drift
    assert torch.equal(drift(x, D, xT, k), drift(x, D, xT, StepScalars(2.0, -3.0, 0.5, 99.0)))


def test_drift_is_accurate_in_float32_where_its_coefficients_cancel():
    """At the first step (t = T - 1e-4, x = x_T) k_x ~ -5e3 and k_T ~ +5e3 cancel to about 1:
    the float32 drift must still be as accurate as its result (the term-by-term sum
    k_x x + k_D D + k_T x_T erred by ~3e-4 here)."""
    sampler = BridgeSampler(VPBridge())
    ts = karras_grid(4, sampler.config)
    (k_first,) = sampler.scalars([ts[0]], "ode")
    assert abs(k_first.k_x) > 4e3 and abs(k_first.k_x + k_first.k_T) < 2
    g = torch.Generator().manual_seed(3)
    x_T, D = torch.randn(4096, generator=g, dtype=torch.float64), torch.rand(4096, generator=g, dtype=torch.float64)
    near = x_T + 1e-3 * torch.randn(4096, generator=g, dtype=torch.float64)  # a later, nearby state
    # (at t_min, k_x and k_D cancel and the drift errs by ~1e-3, but its step is dt = -1e-4:
    # 1e-7 in the state, which test_float32_decode_is_close_to_float64 bounds end to end)
    for k, x in ((k_first, x_T), (k_first, near)):
        x32, D32, x_T32 = x.float(), D.float(), x_T.float()
        # exact on the float32 inputs: the error of the evaluation, not of rounding the inputs
        exact = k.k_x * x32.double() + k.k_D * D32.double() + k.k_T * x_T32.double()
        scale = float(exact.abs().max())
        assert float((drift(x32, D32, x_T32, k).double() - exact).abs().max()) < 1e-5 * max(scale, 1.0)


def test_float32_decode_is_close_to_float64():
    """The whole decode in float32 against float64 (reference sampler): the rounding left is
    that of the networks and the state, about 1e-6 (it was 2e-4 to 7e-4 before the drift was
    rewritten); a float64 model decodes on the reference sampler, the kernels have no float64."""
    import copy

    from dbae.config import get_preset
    from dbae.model import DBAE

    torch.manual_seed(0)
    model = DBAE(get_preset("tiny16").model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised layer hides the sampler's work
        model64 = copy.deepcopy(model).double()
        z = torch.randn(4, model.config.z_dim, generator=torch.Generator().manual_seed(1))
        for sampler_name, nfe in (("euler", 3), ("euler", 10), ("heun", 5)):
            exact = model64.decode(z.double(), nfe, sampler=sampler_name).images
            got = model.decode(z, nfe, sampler=sampler_name).images.double()
            assert float((got - exact).abs().max()) < 5e-5, sampler_name


# ---------------------------------------------------------------------------
# Churn: randomness and validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
def test_churn_reproducible(sampler, toy, sampler_name):
    x_T, _ = toy
    den = lambda x, t: torch.tanh(x) * (1 - t)  # noqa: E731

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return sampler.sample(den, x_T, steps=8, sampler=sampler_name, churn=0.33, generator=g).images

    a, b, c = run(123), run(123), run(124)
    assert torch.equal(a, b)
    assert float((a - c).abs().max()) > 1e-3
    # churn = 0 is deterministic and draws nothing from the generator
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    d1 = sampler.sample(den, x_T, steps=8, sampler=sampler_name, churn=0.0, generator=g).images
    assert torch.equal(g.get_state(), state)
    d2 = sampler.sample(den, x_T, steps=8, sampler=sampler_name).images
    assert torch.equal(d1, d2)


@pytest.mark.parametrize("churn", [-0.1, 1.0, 1.5, float("nan")])
def test_churn_out_of_range_raises(sampler, churn):
    def never(x, t):
        raise AssertionError("denoiser must not be called")

    with pytest.raises(ValueError, match="churn"):
        sampler.sample(never, torch.zeros(1, 1, 2, 2), steps=3, churn=churn)


@pytest.mark.parametrize("churn", [0.1, 0.5])
def test_churn_noise_scale(sampler, churn):
    """The churn sub-step is Euler-Maruyama from t_0 to t_hat: the state handed to the
    second evaluation has spread sqrt(|t_hat - t_0|) g(t_0) around a deterministic value."""
    n = 40_000
    x_T = torch.full((n,), 0.3, dtype=torch.float64)
    rec = Recorder(lambda x, t: torch.zeros_like(x))
    sampler.sample(rec, x_T, steps=4, sampler="euler", churn=churn, generator=torch.Generator().manual_seed(21))
    grid = karras_grid(4)
    assert rec.ts[1] == pytest.approx(grid[0] + churn * (grid[1] - grid[0]), rel=1e-14)
    expected_std = math.sqrt(churn * (grid[0] - grid[1])) * math.sqrt(0.1 + 2.0 * grid[0])
    std = float(rec.xs[1].std())
    assert abs(std / expected_std - 1) < 5 * math.sqrt(0.5 / n)
    assert torch.equal(rec.xs[0], x_T)


def test_bad_arguments_raise(sampler):
    with pytest.raises(ValueError):
        sampler.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), steps=3, sampler="dpm")
    with pytest.raises(ValueError):
        sampler.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), steps=0)


# ---------------------------------------------------------------------------
# C++ scalars vs the reference scalars (DBAE_KERNELS fallback switch)
# ---------------------------------------------------------------------------


class _Spy:
    def __init__(self, mod):
        self.mod = mod
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self.mod, name)
        if name == "drift_coefficients":
            def wrapped(*args, **kwargs):
                self.calls += 1
                return attr(*args, **kwargs)
            return wrapped
        return attr


@pytest.mark.parametrize("churn", [0.0, 0.33])
@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
def test_cxx_and_reference_scalars_agree(monkeypatch, toy, sampler_name, churn):
    if _ext.C is None:
        pytest.skip("extension disabled (DBAE_KERNELS=reference) or not built")
    x_T, _ = toy
    den = lambda x, t: torch.tanh(2 * x) * (1 - 0.5 * t)  # noqa: E731
    smp = BridgeSampler()
    spy = _Spy(_ext.C)
    monkeypatch.setattr(_ext, "C", spy)
    fast = smp.sample(den, x_T, steps=12, sampler=sampler_name, churn=churn,
                      generator=torch.Generator().manual_seed(8)).images
    assert spy.calls > 0, "sampler did not use the C++ scalars"
    monkeypatch.setattr(_ext, "C", None)
    ref = smp.sample(den, x_T, steps=12, sampler=sampler_name, churn=churn,
                     generator=torch.Generator().manual_seed(8)).images
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    assert spy.calls == (2 if churn > 0 else 1) + (1 if sampler_name == "heun" else 0)


def test_scalars_reference_fallback(monkeypatch, sampler):
    ts = karras_grid(20)[:-1]
    monkeypatch.setattr(_ext, "C", None)
    rows = sampler.scalars(ts, "ode")
    assert len(rows) == len(ts) and all(isinstance(r, StepScalars) for r in rows)
    assert all(isinstance(getattr(r, f), float) for r in rows for f in ("k_x", "k_D", "k_T", "g"))
    for r, t in zip(rows, ts):
        assert r.g == pytest.approx(math.sqrt(0.1 + 2.0 * t), rel=1e-14)


def test_scalars_unknown_mode_raises_on_both_paths(monkeypatch, sampler):
    with pytest.raises(ValueError):
        sampler.scalars([0.5], "bogus")  # C++ path when built
    monkeypatch.setattr(_ext, "C", None)
    with pytest.raises(ValueError):
        sampler.scalars([0.5], "bogus")


def test_one_time_preconditioning_is_host_scalars():
    """The samplers pass one time per step as a float: the model then computes the
    preconditioning once on the host (float64) and hands the device scalar operands, no
    per-sample float64 tensors (which a CUDA graph would replay as some thirty kernels per
    evaluation), with exactly the values of the per-sample tensor path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dbae.config import get_preset
    from dbae.model import DBAE

    class Float64PerSample(TorchDispatchMode):
        def __init__(self, batch: int) -> None:
            super().__init__()
            self.batch, self.seen = batch, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.dtype == torch.float64 and o.dim() and o.shape[0] == self.batch:
                    self.seen.append(str(func))
            return out

    torch.manual_seed(0)
    model = DBAE(get_preset("tiny16").model).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        x_T = model.endpoint(z)
        per_sample = model.denoise(x, torch.full((3,), 0.37, dtype=torch.float64), x_T, z)
        with Float64PerSample(3) as mode:
            one_time = model.denoise(x, 0.37, x_T, z)
        assert mode.seen == []
        with Float64PerSample(3) as mode:
            model.denoise(x, torch.full((3,), 0.37, dtype=torch.float64), x_T, z)
        assert mode.seen  # the tensor path does its float64 math per sample (what the check detects)
    assert torch.equal(one_time, per_sample)
