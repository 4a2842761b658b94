"""Fused sampler steps (dbae.fused_step, csrc/fused_step/) against their pure-PyTorch references.

Tolerances. The kernels evaluate the reference's float32 expressions in the same order with no
FMA contraction, so outside the noise they agree exactly; the checks allow float32 round-off
(rtol = atol = 1e-6) and one unit of the storage format for float16/bfloat16 (rtol = its eps).
The churn noise differs from the reference's torch.log/cos/sin by the kernels' own log and
sincos (<= 2 ulp): |difference| <= 1e-5 noise_scale.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from dbae import fused_step as fs
from dbae.bridge import VPBridge, karras_grid
from dbae.sampling import BridgeSampler, StepScalars

REFERENCE_ONLY = os.environ.get("DBAE_KERNELS", "auto").lower() == "reference"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2**-7, 1e-6), torch.float16: (2**-10, 1e-6)}
NOISE_ATOL = 1e-5
# numel around the vector widths (4, 8, 16), the 4-element Philox groups and the thread split
SIZES = [0, 1, 3, 5, 7, 8, 13, 31, 33, 1023, 4097, 100_003]
ODE = StepScalars(k_x=-1.3, k_D=2.1, k_T=-0.4, g=1.2)
S = fs.FusedScalars(c_skip=0.6, c_out=0.9, k=ODE, dt=-0.05)


@pytest.fixture(scope="module")
def ops():
    """The compiled kernels must be there unless the reference is forced."""
    if REFERENCE_ONLY:
        pytest.skip("DBAE_KERNELS=reference")
    assert "cpu" in fs.KERNEL_DEVICES, f"fused-step ops missing: {fs.report()}"
    return torch.ops.dbae


def _inputs(n, dtype, count=3, scale=2.0, seed=0):
    """Tensors with values well beyond [-1, 1] so that the clamp is active."""
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n, generator=g)).to(dtype) for _ in range(count)]


def _close(got, ref, dtype):
    rtol, atol = TOL[dtype]
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, equal_nan=True)


def _all_steps(x, F, x_T, s, *, clamp=True, ref=False):
    """Every step on the same inputs, through the dispatching API or the references."""
    euler, predict, correct, churn = (
        (fs.euler_step_reference, fs.heun_predict_reference, fs.heun_correct_reference, fs.churn_step_reference)
        if ref
        else (fs.euler_step, fs.heun_predict, fs.heun_correct, fs.churn_step)
    )
    x_pred, d = predict(x, F, x_T, s, clamp=clamp)
    return {
        "euler": euler(x, F, x_T, s, clamp=clamp),
        "x_pred": x_pred,
        "d": d,
        "heun": correct(x, d, x_pred, F, x_T, s, clamp=clamp),
        "churn": churn(x, F, x_T, s, 1234, 5, clamp=clamp),
    }


def _check_parity(x, F, x_T, dtype, **kw):
    got, ref = _all_steps(x, F, x_T, S, **kw), _all_steps(x, F, x_T, S, ref=True, **kw)
    for name in ("euler", "x_pred", "d", "heun"):
        _close(got[name], ref[name], dtype)
    rtol, _ = TOL[dtype]
    torch.testing.assert_close(got["churn"], ref["churn"], rtol=rtol, atol=NOISE_ATOL * S.noise_scale)


# ----- parity -----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_parity_odd_sizes(ops, dtype, n):
    x, F, x_T = _inputs(n, dtype)
    _check_parity(x, F, x_T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_image_batch_and_clamp_active(ops, dtype):
    x, F, x_T = (t.view(4, 3, 17, 19) for t in _inputs(4 * 3 * 17 * 19, dtype, seed=1))
    D = S.c_skip * x.float() + S.c_out * F.float()
    assert (D.abs() > 1).float().mean() > 0.3, "the test inputs must exercise the clamp"
    _check_parity(x, F, x_T, dtype)
    # the clamp changes the result, and clamp=False follows the reference too
    assert not torch.equal(fs.euler_step(x, F, x_T, S), fs.euler_step(x, F, x_T, S, clamp=False))
    _check_parity(x, F, x_T, dtype, clamp=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_conversions_match_torch(ops, dtype):
    """Every finite value of the format, read and written back exactly, and float32 results
    rounded as torch rounds them: ties to even, subnormals, overflow to infinity."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x_T = bits.view(dtype)
    x_T = x_T[x_T.isfinite()]
    zero = torch.zeros_like(x_T)
    mantissa = 10 if dtype == torch.float16 else 7
    for dt in (1.0, 1 + 2.0 ** -(mantissa + 1), 1 / 3, 2.0**-13, 7e4):
        s = fs.FusedScalars(0.0, 0.0, StepScalars(0.0, 0.0, 1.0, 0.0), dt)  # x_next = dt x_T
        got = fs.euler_step(zero, zero, x_T, s)
        assert torch.equal(got, fs.euler_step_reference(zero, zero, x_T, s)), dt
        if dt == 1.0:
            assert torch.equal(got, x_T)


def test_matches_sampling_drift_by_hand(ops):
    x, F, x_T = _inputs(1000, torch.float64, seed=2)
    D = (S.c_skip * x + S.c_out * F).clamp(-1, 1)
    d = ODE.k_x * x + ODE.k_D * D + ODE.k_T * x_T
    x_pred, d_got = fs.heun_predict(*(t.float() for t in (x, F, x_T)), S)
    torch.testing.assert_close(d_got.double(), d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_pred.double(), x + S.dt * d, rtol=1e-5, atol=1e-5)


def test_nan_propagates_through_clamp(ops):
    x, F, x_T = _inputs(16, torch.float32)
    F[3] = math.nan
    out = fs.euler_step(x, F, x_T, S)
    assert out[3].isnan() and out.isnan().sum() == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(ops, dtype):
    a, F, b = _inputs(2 * 3 * 22 * 40, dtype, seed=3)
    x = a[: 2 * 3 * 20 * 22].view(2, 3, 20, 22).transpose(-1, -2)  # (2, 3, 22, 20), transposed
    x_T = b.view(2, 3, 22, 40)[..., 5:25]  # (2, 3, 22, 20), a slice
    F = F[: x.numel()].view(x.shape)
    assert not x.is_contiguous() and not x_T.is_contiguous()
    got = _all_steps(x, F, x_T, S)
    want = _all_steps(x.contiguous(), F, x_T.contiguous(), S)
    for name, out in got.items():
        assert out.is_contiguous() and out.shape == x.shape
        assert torch.equal(out, want[name]), name


def test_unaligned_storage_offset(ops):
    x, F, x_T = _inputs(1001, torch.float32, seed=4)
    got = fs.euler_step(x[1:], F[1:], x_T[1:], S)
    assert torch.equal(got, fs.euler_step(x[1:].clone(), F[1:].clone(), x_T[1:].clone(), S))


# ----- noise -----


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32-10: counter, key -> output."""
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, out in kat:
        got = fs.philox4x32_10(tuple(torch.tensor([c]) for c in ctr), key)
        assert [int(w) for w in got] == list(out)


def _noise(n, seed, offset, dtype=torch.float32):
    """eps itself: a churn step with zero state and drift, dt = -1 and g = 1."""
    zero = torch.zeros(n, dtype=dtype)
    s = fs.FusedScalars(0.0, 0.0, StepScalars(0.0, 0.0, 0.0, 1.0), -1.0)
    return fs.churn_step(zero, zero, zero, s, seed, offset)


def test_noise_matches_reference_stream():
    n = 1 << 16
    for seed, offset in [(0, 0), (7, 3), (2**40 + 5, 2**33 + 1), (2**63 - 1, 2**63 - 1)]:
        torch.testing.assert_close(_noise(n, seed, offset), fs.philox_normal(n, seed, offset), rtol=0, atol=NOISE_ATOL)


def test_noise_statistics():
    n = 1 << 20
    eps = _noise(n, 42, 0).double()
    tol = 6 / math.sqrt(n)
    assert abs(eps.mean()) < tol
    assert abs(eps.var() - 1) < 6 * math.sqrt(2 / n)
    assert abs((eps**4).mean() - 3) < 6 * math.sqrt(96 / n)  # kurtosis of a normal
    ks = (torch.special.ndtr(eps.sort().values) - (torch.arange(n) + 0.5) / n).abs().max()
    assert ks < 1.63 / math.sqrt(n) + 1 / n  # Kolmogorov-Smirnov at the 1% level
    assert eps.abs().max() < 5.8  # the Box-Muller radius is bounded by sqrt(2 ln 2^24)
    # independence: neighbours, the lanes of a Philox group, other seeds and offsets
    lanes = eps.view(-1, 4)
    pairs = [(eps[:-1], eps[1:]), (lanes[:, 0], lanes[:, 1]), (lanes[:, 0] ** 2, lanes[:, 1] ** 2),
             (lanes[:, 1], lanes[:, 2]), (eps, _noise(n, 43, 0).double()), (eps, _noise(n, 42, 1).double())]
    for a, b in pairs:
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(corr) < 6 / math.sqrt(len(a)), corr


def test_noise_reproducible_and_layout_free():
    a = _noise(100_003, 9, 2)
    assert torch.equal(a, _noise(100_003, 9, 2))
    # element i's noise does not depend on the size of the tensor, nor on the thread split
    assert torch.equal(_noise(37, 9, 2), a[:37])
    assert not torch.equal(a, _noise(100_003, 9, 3)) and not torch.equal(a, _noise(100_003, 10, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_noise_low_precision_storage(dtype):
    torch.testing.assert_close(_noise(4096, 1, 1, dtype), fs.philox_normal(4096, 1, 1).to(dtype))


# ----- errors -----


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_bad_inputs_raise(impl, request):
    step = fs.euler_step_reference
    if impl == "ops":
        request.getfixturevalue("ops")
        step = fs.euler_step
    x, F, x_T = _inputs(12, torch.float32)
    with pytest.raises(RuntimeError, match="shape"):
        step(x, F[:6], x_T, S)
    with pytest.raises(RuntimeError, match="dtype"):
        step(x, F.half(), x_T, S)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        step(x.double(), F.double(), x_T.double(), S)


def test_negative_seed_raises(ops):
    x, F, x_T = _inputs(8, torch.float32)
    with pytest.raises(RuntimeError, match="non-negative"):
        fs.churn_step(x, F, x_T, S, -1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        fs.churn_step_reference(x, F, x_T, S, 0, -1)


# ----- backend selection -----


def test_backend_selection(monkeypatch, ops):
    assert fs.backend("cpu") == "cpu" and "cpu" in fs.report()
    monkeypatch.setattr(fs, "_MODE", "cuda")
    x, F, x_T = _inputs(8, torch.float32)
    with pytest.raises(RuntimeError, match="DBAE_KERNELS=cuda"):
        fs.euler_step(x, F, x_T, S)
    monkeypatch.setattr(fs, "_MODE", "gpu")
    with pytest.raises(ValueError, match="DBAE_KERNELS='gpu'"):
        fs.backend("cpu")
    monkeypatch.setattr(fs, "_MODE", "cpu")
    assert fs.backend("cpu") == "cpu"
    if "cuda" not in fs.KERNEL_DEVICES:
        monkeypatch.setattr(fs, "_MODE", "cuda")
        with pytest.raises(RuntimeError, match="cuda kernels are unavailable"):
            fs.backend("cuda")


def test_ops_loader_reports_missing_and_broken_libraries(monkeypatch, tmp_path):
    import dbae
    from dbae import _ext

    monkeypatch.setattr(_ext, "OPS_LIBRARY", "missing_ops.so")
    assert "was not built" in _ext.load_ops()
    (tmp_path / "broken_ops.so").write_bytes(b"not a shared library")
    monkeypatch.setattr(dbae, "__path__", [str(tmp_path), *dbae.__path__])
    monkeypatch.setattr(_ext, "OPS_LIBRARY", "broken_ops.so")
    assert "failed to load" in _ext.load_ops()


def test_forced_reference_fallback():
    script = (
        "import torch; from dbae import fused_step as fs; from dbae.sampling import StepScalars\n"
        "assert fs.backend('cpu') == 'reference' and fs.KERNEL_DEVICES == (), fs.report()\n"
        "s = fs.FusedScalars(0.6, 0.9, StepScalars(-1.3, 2.1, -0.4, 1.2), -0.05)\n"
        "x, F, x_T = (torch.randn(3, 5, 7) * 2 for _ in range(3))\n"
        "assert torch.equal(fs.euler_step(x, F, x_T, s), fs.euler_step_reference(x, F, x_T, s))\n"
        "assert torch.equal(fs.churn_step(x, F, x_T, s, 1, 2), fs.churn_step_reference(x, F, x_T, s, 1, 2))\n"
        "print(fs.report())\n"
    )
    env = {**os.environ, "DBAE_KERNELS": "reference"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "DBAE_KERNELS=reference" in out.stdout


# ----- torch.compile -----


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # Inductor's imports
def test_compile_fullgraph_uses_the_ops(ops):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def sampler_steps(x, F, x_T):
        x_pred, d = fs.heun_predict(x, F, x_T, S)
        x = fs.heun_correct(x, d, x_pred, F, x_T, S)
        x = fs.churn_step(x, F, x_T, S, 11, 0)
        return fs.euler_step(x, F, x_T, S)

    x, F, x_T = (t.view(2, 3, 8, 8) for t in _inputs(384, torch.float32, seed=5))
    torch._dynamo.reset()
    want = sampler_steps(x, F, x_T)
    assert torch.equal(torch.compile(sampler_steps, fullgraph=True, backend=record)(x, F, x_T), want)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {f"dbae.{op}" for op in ("heun_predict", "heun_correct", "churn_step", "euler_step")} <= targets
    # the fake implementations carry the shapes through AOT tracing and Inductor
    torch._dynamo.reset()
    assert torch.equal(torch.compile(sampler_steps, fullgraph=True)(x, F, x_T), want)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_of_the_references():
    """The fallback compiles too: Euler and Heun in one graph; the churn noise runs eagerly (a
    graph break), since Inductor would inline the ten Philox rounds into an exponentially large
    expression."""

    def heun(x, F, x_T):
        x_pred, d = fs.heun_predict_reference(x, F, x_T, S)
        return fs.euler_step_reference(fs.heun_correct_reference(x, d, x_pred, F, x_T, S), F, x_T, S)

    x, F, x_T = (t.view(2, 3, 4, 4) for t in _inputs(96, torch.float32, seed=7))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(heun, fullgraph=True)(x, F, x_T), heun(x, F, x_T))
    compiled = torch.compile(fs.churn_step_reference)
    torch.testing.assert_close(compiled(x, F, x_T, S, 3, 4), fs.churn_step_reference(x, F, x_T, S, 3, 4))


# ----- a whole sampler built from the fused steps -----


def _fused_sample(F_fn, x_T, steps, heun):
    """Euler/Heun decoding with the fused steps: the integration recommended for dbae.sampling."""
    sampler = BridgeSampler()
    ts = karras_grid(steps, sampler.config)
    ode, ode_next = sampler.scalars(ts[:-1], "ode"), sampler.scalars(ts[1:-1], "ode")
    x = x_T
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        s = fs.FusedScalars.at(sampler.bridge, t, ode[i], t_next - t)
        if heun and t_next > 0:
            x_pred, d = fs.heun_predict(x, F_fn(x, t), x_T, s)
            s_next = fs.FusedScalars.at(sampler.bridge, t_next, ode_next[i], t_next - t)
            x = fs.heun_correct(x, d, x_pred, F_fn(x_pred, t_next), x_T, s_next)
        else:
            x = fs.euler_step(x, F_fn(x, t), x_T, s)
    return x


@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
def test_fused_sampler_matches_bridge_sampler(sampler_name):
    bridge = VPBridge()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))

    def F_fn(x, t):
        return torch.tanh(0.8 * x - 0.5 * x_T + t)

    def denoise(x, t):
        pre = bridge.preconditioning(torch.full((x.shape[0],), t, dtype=torch.float64))
        c_skip, c_out = (c.float().view(-1, 1, 1, 1) for c in pre[1:3])
        return (c_skip * x + c_out * F_fn(x, t)).clamp(-1, 1)

    want = BridgeSampler(bridge).sample(denoise, x_T, steps=6, sampler=sampler_name).images
    got = _fused_sample(F_fn, x_T, 6, sampler_name == "heun")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----- CUDA (runs only where torch has CUDA and the CUDA kernels were built) -----

cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in fs.KERNEL_DEVICES), reason="no CUDA device or CUDA kernels"
)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 33, 4097, 1 << 20])
def test_cuda_matches_cpu_kernels_exactly(dtype, n):
    """Same float32 expressions, no FMA (-fmad=false): bit-identical to the CPU kernels."""
    x, F, x_T = _inputs(n + 1, dtype)
    for offset in (0, 1):  # 1: storage not 16-byte aligned, the scalar path
        cpu = [t[offset:] for t in (x, F, x_T)]
        got = _all_steps(*(t.cuda() for t in cpu), S)
        for name, want in _all_steps(*cpu, S).items():
            assert torch.equal(got[name].cpu(), want), (name, offset)


@cuda
def test_cuda_graph_capture():
    x, F, x_T = (t.cuda() for t in _inputs(3 * 64 * 64, torch.float32))

    def steps(x):
        return fs.churn_step(fs.euler_step(x, F, x_T, S), F, x_T, S, 3, 1)

    want = steps(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = steps(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
