"""Tests of the fused training ops (dbae.kernels).

Without CUDA, the Triton kernels run on the CPU through the Triton interpreter:
TRITON_INTERPRET=1 is set below, before dbae.kernels (and with it triton) is imported,
because Triton decides at import whether its kernels are interpreted (and reads the
variable again at launch, so it stays set). Where CUDA is available the same tests run the
compiled kernels on CUDA tensors (DEVICE). Tests that need the kernels skip when Triton is not installed; the
reference path, the dispatch and the torch.compile checks run everywhere. What the CPU
cannot run is checked as far as it can be: the kernels are compiled for sm_90, and the ops
are traced on fake CUDA tensors (both in subprocesses, with real, non-interpreted kernels).

Parity: kernels and reference (dbae.kernels.reference) are compared on the same noise,
eps = bridge_noise(shape, seed, DEVICE): the kernels' own Philox stream, passed explicitly to the
reference. Gradients are compared against plain autograd of the reference forward
functions, so the hand-written backward passes (Triton and reference alike) are checked
against an independent derivation.

Tolerances: both sides evaluate the same float32 expressions (differing only in operation
order and FMA contraction, ~1e-7 relative) and round once to the output dtype, so an
output may differ by one unit in the last place of its dtype: relative 2**-7 for
bfloat16 (8 significant bits), 2**-10 for float16 (11 bits); 1e-5 for float32 leaves
room for the float32 differences themselves. The absolute tolerance is that relative one
times the largest reference magnitude (values near zero are rounded on a finer grid). The
per-sample MSE is accumulated in float32 whatever the input dtype: relative 1e-5.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch  # noqa: E402  (torch does not import triton)

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (through dbae.kernels)

import pytest  # noqa: E402

from dbae.bridge import VPBridge  # noqa: E402
from dbae.kernels import available, bridge_input, bridge_loss, bridge_noise, bridge_table  # noqa: E402
from dbae.kernels import backend, reference  # noqa: E402
from dbae.kernels.bridge_train import LaunchConfig, launched_with  # noqa: E402
from dbae.kernels import table as col  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
MSE_RTOL = 1e-5
ODD_SHAPE = (3, 3, 7, 7)  # 147 values per sample: one partly masked program per sample
MULTI_BLOCK_SHAPE = (2, 3, 37, 40)  # 4440 values per sample: a full 4096-value program and a tail
SHAPES = pytest.mark.parametrize("shape", [ODD_SHAPE, MULTI_BLOCK_SHAPE], ids=["odd", "multiblock"])
SEED = 1234
#: where the kernels run: compiled on CUDA where there is a GPU, else interpreted on the CPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _why_no_triton() -> str:
    if backend.kernel_module() is None:
        return "triton is not installed"
    return f"the Triton kernels cannot run on {DEVICE} (dbae.kernels imported before TRITON_INTERPRET=1 was set?)"


needs_triton = pytest.mark.skipif(not available(DEVICE), reason=_why_no_triton())


@pytest.fixture(params=[pytest.param("triton", marks=needs_triton), "reference"])
def mode(request, monkeypatch) -> str:
    """Run the test with the ops forced onto the Triton kernels, then onto the reference."""
    monkeypatch.setenv(backend.ENV_VAR, request.param)
    return request.param


def _inputs(shape, dtypes, *, seed=0):
    """x0 in [-1, 1], x_T, F (x0, x_T, F require grad) and the table for t spread over [t_min, T]."""
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(DEVICE, dtypes[0]).requires_grad_()
    x_T = (0.5 * torch.randn(shape, generator=g)).to(DEVICE, dtypes[1]).requires_grad_()
    F = torch.randn(shape, generator=g).to(DEVICE, dtypes[2]).requires_grad_()
    t = torch.linspace(1e-4, 1.0, shape[0], device=DEVICE)  # both ends of the training range
    return x0, x_T, F, bridge_table(VPBridge(), t)


def _assert_close(actual, expected, dtype):
    rtol = RTOL[dtype]
    atol = rtol * float(expected.detach().abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _vjp(outputs, cotangents, inputs):
    """Gradients of sum_k <outputs[k], cotangents[k]> (float32) with respect to inputs."""
    total = sum((o.float() * c.float()).sum() for o, c in zip(outputs, cotangents))
    return _grad(total, inputs)


def _grad(loss, inputs):
    return torch.autograd.grad(loss, inputs, retain_graph=True)


# ---------------------------------------------------------------------------
# the coefficient table, input checks, dispatch
# ---------------------------------------------------------------------------


def test_table_columns_come_from_the_bridge():
    bridge = VPBridge()
    t = torch.tensor([1e-4, 0.01, 0.3, 0.7, 0.99, 1.0])
    table = bridge_table(bridge, t)
    assert table.dtype == torch.float32 and table.shape == (6, col.NUM_COLUMNS)
    t64 = t.double()
    a, b, v = bridge.coefficients(t64)
    pre = bridge.preconditioning(t64)
    expected = {
        col.A: a, col.B: b, col.SQRT_V: v.sqrt(), col.C_IN: pre.c_in,
        col.C_SKIP: pre.c_skip, col.C_OUT: pre.c_out, col.WEIGHT: bridge.loss_weight(t64),
    }  # fmt: skip
    for index, values in expected.items():
        assert torch.equal(table[:, index], values.float()), index


def test_bad_inputs_are_refused():
    x0, x_T, F, table = _inputs(ODD_SHAPE, (torch.float32,) * 3)
    with pytest.raises(ValueError, match="float32 of shape"):
        bridge_input(x0, x_T, table[:2], 0)
    with pytest.raises(ValueError, match="float32 of shape"):
        bridge_input(x0, x_T, table.double(), 0)
    with pytest.raises(ValueError, match="must match"):
        bridge_input(x0, x_T[:, :2], table, 0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        bridge_loss(F.double(), x0, x_T, table, 0)
    with pytest.raises(ValueError, match="seed"):
        bridge_input(x0, x_T, table, -1)
    with pytest.raises(ValueError, match="samples"):
        bridge_input(x0[:0], x_T[:0], table[:0], 0)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        bridge_table(VPBridge(), torch.ones(2, 1))


def test_dispatch_setting(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=backend.ENV_VAR):
        backend.mode()
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert not backend.use_triton(cpu)
    monkeypatch.setenv(backend.ENV_VAR, "cuda")  # selects dbae.fused_step's kernels: auto here
    assert backend.mode() == "auto"
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.use_triton(cpu) == available("cpu")
    assert not backend.use_triton(cpu, traced=True)  # CPU kernels are interpreted (or absent): not traceable
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="cannot run"):
        backend.use_triton(cpu, traced=True)


def test_import_and_ops_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, dbae.kernels as k\n"
        "from dbae.bridge import VPBridge\n"
        "assert not k.available() and not k.available('cpu')\n"
        "x = torch.randn(2, 3, 4, 4, requires_grad=True)\n"
        "table = k.bridge_table(VPBridge(), torch.tensor([0.3, 0.7]))\n"
        "x_t, x_in = k.bridge_input(x, x, table, 0)\n"
        "(k.bridge_loss(x_in, x, x, table, 0).loss + x_t.sum()).backward()\n"
        "assert x.grad is not None\n"
    )
    env = {**os.environ, backend.ENV_VAR: "auto"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Triton not available" not in run.stderr  # no warning from torch at import


# The interpreter is more permissive than the compiler: compile every kernel, in the
# variants the ops launch, for an H100 (sm_90) without a GPU. Runs in a subprocess, where
# TRITON_INTERPRET is unset so that the kernels are JIT functions.
_COMPILE_SCRIPT = """
import warnings; warnings.simplefilter("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dbae.kernels import bridge_kernels as k

def compile_(kernel, pointers, scalars, constants):
    # as launched on 16-byte aligned tensors with P a multiple of 16: the vectorised code
    signature = {**pointers, **scalars, **{name: "constexpr" for name in constants}}
    aligned = [kernel.arg_names.index(name) for name in (*pointers, "P")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

bf16 = lambda *names: {name: "*bf16" for name in names}
table = {"table_ptr": "*fp32"}
ints, ints64 = {"seed": "i32", "P": "i32"}, {"seed": "i64", "P": "i32"}
rounds = {"ROUNDS": 10}
compile_(k.noise_kernel, {"out_ptr": "*fp32"}, ints, rounds)
compile_(k.bridge_input_kernel, {**bf16("x0_ptr", "x_T_ptr", "x_t_ptr", "x_in_ptr"), **table}, ints64, {"ROUNDS": 7})
absent = {"grad_x_t_ptr": None, "grad_x0_ptr": None}
flags = {"HAS_GRAD_X_T": False, "HAS_GRAD_X_IN": True, "WANT_X0": False}
compile_(k.bridge_input_backward_kernel, {**bf16("grad_x_in_ptr", "grad_x_T_ptr"), **table}, {"P": "i32"},
         {**absent, **flags})
all_grads = bf16("grad_x_t_ptr", "grad_x_in_ptr", "grad_x_T_ptr", "grad_x0_ptr")
compile_(k.bridge_input_backward_kernel, {**all_grads, **table}, {"P": "i32"},
         {"HAS_GRAD_X_T": True, "HAS_GRAD_X_IN": True, "WANT_X0": True})
compile_(k.bridge_mse_kernel, {**bf16("F_ptr", "x0_ptr", "x_T_ptr"), **table, "partial_ptr": "*fp32"}, ints, rounds)
finish = {"partial_ptr": "*fp32", **table, "mse_ptr": "*fp32", "loss_ptr": "*fp32"}
compile_(k.bridge_loss_finish_kernel, finish, {"B": "i32", "NUM_PARTIALS": "i32", "P": "i32"}, {"ROWS": 256, "COLUMNS": 16})
grads = {"grad_loss_ptr": "*fp32", "grad_mse_ptr": "*fp32", **table,
         **bf16("F_ptr", "x0_ptr", "x_T_ptr", "grad_F_ptr", "grad_x_T_ptr")}
has = {"HAS_GRAD_LOSS": True, "HAS_GRAD_MSE": True}
compile_(k.bridge_loss_backward_kernel, grads, ints, {**rounds, **has, "grad_x0_ptr": None, "WANT_X0": False})
compile_(k.bridge_loss_backward_kernel, {**grads, **bf16("grad_x0_ptr")}, ints,
         {**rounds, "HAS_GRAD_LOSS": True, "HAS_GRAD_MSE": False, "grad_mse_ptr": None, "WANT_X0": True})
"""


@pytest.mark.skipif(backend.kernel_module() is None, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr


# What torch.compile sees for CUDA tensors, without a GPU: AOTAutograd traces the ops on fake
# CUDA tensors; each must decompose into its Triton kernel (triton_op), not an opaque call.
_TRACE_SCRIPT = """
import logging, torch
logging.disable(logging.WARNING)  # torch warns that it cannot analyse kernel mutations without a driver
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
from torch._subclasses.fake_tensor import FakeTensorMode
import dbae.kernels  # registers the ops

class Traced(Exception):
    pass

def compiler(gm, inputs):  # stop before anything runs: there is no GPU
    nodes = [n for n in gm.graph.nodes if n.target is triton_kernel_wrapper_functional]
    raise Traced(sorted(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in nodes))

def step(x0, x_T, F, table, grad_mse):
    ops = torch.ops.dbae
    x_t, x_in = ops.bridge_input(x0, x_T, table, 5)
    return (
        ops.bridge_loss(F, x0, x_T, table, 5),
        ops.bridge_input_backward(None, x_in, table, x0.dtype, x_T.dtype, True),
        ops.bridge_loss_backward(None, grad_mse, F, x0, x_T, table, 5, False),
    )

with FakeTensorMode():
    x0, x_T, F = (torch.empty(2, 3, 8, 8, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    try:
        aot_function(step, fw_compiler=compiler)(x0, x_T, F, torch.empty(2, 7, device="cuda"), torch.empty(2, device="cuda"))
    except Traced as traced:
        print(" ".join(traced.args[0]))
"""


@pytest.mark.skipif(backend.kernel_module() is None, reason="triton is not installed")
def test_ops_trace_into_their_kernels_for_cuda_tensors():
    env = {name: value for name, value in os.environ.items() if name not in ("TRITON_INTERPRET", backend.ENV_VAR)}
    run = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    expected = (
        "bridge_input_backward_kernel bridge_input_kernel bridge_loss_backward_kernel bridge_loss_finish_kernel "
        "bridge_mse_kernel"
    )
    assert run.stdout.split() == expected.split(), run.stdout + run.stderr


# ---------------------------------------------------------------------------
# every op and its backward against autograd of the reference, on the op's own noise
# ---------------------------------------------------------------------------


@SHAPES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bridge_input_matches_reference(mode, dtype, shape):
    x0, x_T, _, table = _inputs(shape, (dtype,) * 3)
    eps = bridge_noise(shape, SEED, DEVICE)
    got = bridge_input(x0, x_T, table, SEED)
    ref = reference.bridge_input(x0, x_T, table, eps)
    for g, r in zip(got, ref):
        assert g.dtype == dtype
        _assert_close(g, r, dtype)

    cotangents = (torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype))
    # gradients into both outputs, then into x_in alone (x_t unused, as in a training step)
    for used in ((0, 1), (1,)):
        pick = lambda seq: [seq[i] for i in used]  # noqa: E731
        got_grads = _vjp(pick(got), pick(cotangents), (x0, x_T))
        ref_grads = _vjp(pick(ref), pick(cotangents), (x0, x_T))
        for g, r in zip(got_grads, ref_grads):
            assert g.dtype == dtype
            _assert_close(g, r, dtype)

    # x0 without gradient: only x_T's is computed
    x_t, x_in = bridge_input(x0.detach(), x_T, table, SEED)
    (got_x_T,) = _vjp((x_t, x_in), cotangents, (x_T,))
    _assert_close(got_x_T, _vjp(ref, cotangents, (x_T,))[0], dtype)


@SHAPES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bridge_loss_matches_reference(mode, dtype, shape):
    x0, x_T, F, table = _inputs(shape, (dtype,) * 3)
    eps = bridge_noise(shape, SEED, DEVICE)
    got = bridge_loss(F, x0, x_T, table, SEED)
    ref_mse = reference.bridge_mse(F, x0, x_T, table, eps)
    ref_loss = (table[:, col.WEIGHT] * ref_mse).mean()
    assert got.mse.dtype == got.loss.dtype == torch.float32 and got.mse.shape == (shape[0],)
    torch.testing.assert_close(got.mse, ref_mse, rtol=MSE_RTOL, atol=0)
    torch.testing.assert_close(got.loss, ref_loss, rtol=MSE_RTOL, atol=0)

    for g, r in zip(_grad(got.loss, (F, x0, x_T)), _grad(ref_loss, (F, x0, x_T))):
        assert g.dtype == dtype
        _assert_close(g, r, dtype)
    # x0 without gradient: only F's and x_T's are computed
    got = bridge_loss(F, x0.detach(), x_T, table, SEED)
    for g, r in zip(_grad(got.loss, (F, x_T)), _grad(ref_loss, (F, x_T))):
        _assert_close(g, r, dtype)


@pytest.mark.parametrize("upstream", ["mse", "loss_and_mse"])
def test_bridge_loss_gradient_through_mse(mode, upstream):
    """The per-sample mse is an output too (logged, or weighted again by a caller): its
    gradient, alone or with the loss's, must reach F, x0 and x_T."""
    x0, x_T, F, table = _inputs(ODD_SHAPE, (torch.float32,) * 3)
    eps = bridge_noise(ODD_SHAPE, SEED, DEVICE)
    w = torch.tensor([0.5, -2.0, 3.0], device=DEVICE)
    got = bridge_loss(F, x0, x_T, table, SEED)
    ref_mse = reference.bridge_mse(F, x0, x_T, table, eps)
    objective = (w * got.mse).sum()
    ref = (w * ref_mse).sum()
    if upstream == "loss_and_mse":
        objective = objective + 3 * got.loss
        ref = ref + 3 * reference.weighted_loss(ref_mse, table)
    for g, r in zip(_grad(objective, (F, x0, x_T)), _grad(ref, (F, x0, x_T))):
        _assert_close(g, r, torch.float32)


@needs_triton
def test_launch_settings(monkeypatch):
    """Warps per program change no value but the order of the in-program sums (compiled
    kernels reduce across warps); Philox rounds change the stream; bad settings are refused."""
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    x0, x_T, F, table = _inputs(MULTI_BLOCK_SHAPE, (torch.float32,) * 3)
    default = bridge_loss(F, x0, x_T, table, SEED)
    default_x_t, _ = bridge_input(x0, x_T, table, SEED)
    with launched_with(LaunchConfig(num_warps=8)):
        torch.testing.assert_close(bridge_loss(F, x0, x_T, table, SEED).mse, default.mse, rtol=1e-6, atol=0)
        assert torch.equal(bridge_input(x0, x_T, table, SEED)[0], default_x_t)
    with launched_with(LaunchConfig(philox_rounds=7)):
        assert not torch.equal(bridge_noise((2, 50), SEED, DEVICE), bridge_noise((2, 50), SEED + 1, DEVICE))
        seven = bridge_noise((2, 50), SEED, DEVICE)
    assert not torch.equal(seven, bridge_noise((2, 50), SEED, DEVICE))
    for bad in ({"num_warps": 3}, {"philox_rounds": 0}, {"philox_rounds": 11}):
        with pytest.raises(ValueError):
            LaunchConfig(**bad)


def test_mixed_dtypes(mode):
    dtypes = (torch.float32, torch.bfloat16, torch.float16)  # x0, x_T, F, as under autocast
    x0, x_T, F, table = _inputs(ODD_SHAPE, dtypes)
    eps = bridge_noise(ODD_SHAPE, SEED, DEVICE)
    x_t, x_in = bridge_input(x0, x_T, table, SEED)
    ref_x_t, ref_x_in = reference.bridge_input(x0, x_T, table, eps)
    assert x_t.dtype == x_in.dtype == torch.float32  # promoted from float32 and bfloat16
    _assert_close(x_t, ref_x_t, torch.float32)
    _assert_close(x_in, ref_x_in, torch.float32)
    loss = bridge_loss(F, x0, x_T, table, SEED).loss + x_in.sum()
    ref = (table[:, col.WEIGHT] * reference.bridge_mse(F, x0, x_T, table, eps)).mean() + ref_x_in.sum()
    for g, r, dtype in zip(_grad(loss, (x0, x_T, F)), _grad(ref, (x0, x_T, F)), dtypes):
        assert g.dtype == dtype
        _assert_close(g, r, dtype)


def _every_other_column(x: torch.Tensor) -> torch.Tensor:
    """The values of x, stored in every other column of a twice wider buffer."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x.detach()
    return wide[..., ::2].detach().requires_grad_()


def test_non_contiguous_inputs_give_the_contiguous_results(mode):
    """x0 decides the layout (here contiguous): the others, channels-last or strided, are
    brought to it, and every result equals the all-contiguous one bit for bit."""
    x0, x_T, F, table = _inputs((2, 3, 6, 6), (torch.float32,) * 3)
    strided = (
        _every_other_column(x0),
        x_T.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),
        _every_other_column(F),
    )
    assert not any(x.is_contiguous() for x in strided)
    results = []
    for a0, aT, aF in ((x0, x_T, F), strided):
        _, x_in = bridge_input(a0, aT, table, SEED)
        loss = bridge_loss(aF, a0, aT, table, SEED).loss + x_in.square().sum()
        results.append((x_in, loss, *_grad(loss, (a0, aT, aF))))
    for contiguous, non_contiguous in zip(*results):
        assert torch.equal(contiguous, non_contiguous)


def _channels_last(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in tensors]


@needs_triton
def test_channels_last_inputs_run_in_place_with_noise_in_memory_order(monkeypatch):
    """Channels-last images (x0 decides) are not copied: outputs and gradients keep the
    layout, and the noise sits at memory positions, i.e. it is the NHWC noise permuted."""
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    shape = (2, 3, 5, 7)
    x0, x_T, F = _channels_last(*_inputs(shape, (torch.float32,) * 3)[:3])
    table = _inputs(shape, (torch.float32,) * 3)[3]
    B, C, H, W = shape
    eps = bridge_noise((B, H, W, C), SEED, DEVICE).permute(0, 3, 1, 2)  # memory order of NHWC storage
    x_t, x_in = bridge_input(x0, x_T, table, SEED)
    assert x_t.is_contiguous(memory_format=torch.channels_last) and not x_t.is_contiguous()
    ref_x_t, ref_x_in = reference.bridge_input(x0, x_T, table, eps)
    _assert_close(x_t, ref_x_t, torch.float32)
    _assert_close(x_in, ref_x_in, torch.float32)
    got = bridge_loss(F, x0, x_T, table, SEED)
    ref_mse = reference.bridge_mse(F, x0, x_T, table, eps)
    torch.testing.assert_close(got.mse, ref_mse, rtol=MSE_RTOL, atol=0)
    objective = got.loss + x_in.square().sum()
    ref = reference.weighted_loss(ref_mse, table) + ref_x_in.square().sum()
    grads = _grad(objective, (x0, x_T, F))
    for g, r in zip(grads, _grad(ref, (x0, x_T, F))):
        _assert_close(g, r, torch.float32)
    # a contiguous F next to a channels-last x0 is brought to x0's layout: the same loss
    same = bridge_loss(F.detach().contiguous(), x0, x_T, table, SEED)
    assert torch.equal(same.mse, got.mse)


# ---------------------------------------------------------------------------
# the in-kernel noise
# ---------------------------------------------------------------------------

NOISE_SHAPE = (8, 4, 64, 64)  # n = 131072 values
# Thresholds are 5 standard errors of each statistic under N(0, 1) i.i.d. (mean 1/sqrt(n),
# variance sqrt(2/n), skewness sqrt(6/n), excess kurtosis sqrt(24/n), a correlation
# 1/sqrt(n)); the Kolmogorov-Smirnov bound sqrt(n) D < 2.5 has P(exceed) ~ 2 exp(-12.5) ~ 7e-6.
# A false failure is thus a ~1e-6 event for any seed, not a property of the seeds chosen.
_SIGMAS = 5.0


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


@needs_triton
@pytest.mark.parametrize("seed,rounds", [(0, 10), (1, 10), (2**40 + 3, 10), (5, 7)])
def test_noise_is_standard_normal(monkeypatch, seed, rounds):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with launched_with(LaunchConfig(philox_rounds=rounds)):
        eps = bridge_noise(NOISE_SHAPE, seed, DEVICE).flatten().double()
    n = eps.numel()
    assert torch.isfinite(eps).all()
    z = (eps - eps.mean()) / eps.std()
    assert abs(float(eps.mean())) < _SIGMAS / math.sqrt(n)
    assert abs(float(eps.var()) - 1) < _SIGMAS * math.sqrt(2 / n)
    assert abs(float(z.pow(3).mean())) < _SIGMAS * math.sqrt(6 / n)
    assert abs(float(z.pow(4).mean()) - 3) < _SIGMAS * math.sqrt(24 / n)
    empirical = torch.arange(1, n + 1, dtype=torch.float64, device=eps.device) / n
    ks = float((torch.special.ndtr(eps.sort().values) - empirical).abs().max())
    assert math.sqrt(n) * ks < 2.5


@needs_triton
def test_noise_is_independent_across_elements_samples_and_seeds(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    eps = bridge_noise(NOISE_SHAPE, 7, DEVICE).double()
    flat = eps.flatten()
    n = flat.numel()
    bound = _SIGMAS / math.sqrt(n)
    # neighbouring Philox calls (lags 1, 2); the four normals of one call lie TILE apart
    tile = backend.kernel_module().TILE
    for lag in (1, 2, tile, 2 * tile, 3 * tile):
        assert abs(_corr(flat[:-lag], flat[lag:])) < bound, lag
    # the two normals of a Box-Muller pair share a radius: their squares must still be uncorrelated
    assert abs(_corr(flat[:-tile] ** 2, flat[tile:] ** 2)) < bound
    # the same position in neighbouring samples (counter word 1), and in another seed
    by_sample = eps.flatten(1)
    assert abs(_corr(by_sample[:-1].flatten(), by_sample[1:].flatten())) < bound
    assert abs(_corr(flat, bridge_noise(NOISE_SHAPE, 8, DEVICE).double().flatten())) < bound


@needs_triton
def test_noise_is_reproducible_and_layout_independent(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    shape = (3, 5, 9, 9)
    eps = bridge_noise(shape, 99, DEVICE)
    assert torch.equal(eps, bridge_noise(shape, 99, DEVICE))
    assert not torch.equal(eps, bridge_noise(shape, 100, DEVICE))
    # eps[b, i] depends on (seed, b, i) only: not on the batch size, nor on P
    assert torch.equal(bridge_noise((5, *shape[1:]), 99, DEVICE)[:3], eps)
    assert torch.equal(bridge_noise((2, 3000), 99, DEVICE)[:, :100], bridge_noise((2, 100), 99, DEVICE))
    # the ops regenerate exactly this noise: the same seed gives the same loss, bit for bit
    x0, x_T, F, table = _inputs(shape, (torch.float32,) * 3)
    first, second = (bridge_loss(F, x0, x_T, table, 99).mse for _ in range(2))
    assert torch.equal(first, second)
    x_t, _ = bridge_input(x0, x_T, table, 99)
    torch.testing.assert_close(x_t, reference.bridge_input(x0, x_T, table, eps)[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# torch.compile of a training step
# ---------------------------------------------------------------------------


class _TinyAutoencoder(torch.nn.Module):
    """z -> x_T by a linear decoder; F from (x_in, x_T) by one convolution."""

    def __init__(self, channels: int, size: int, z_dim: int) -> None:
        super().__init__()
        self.shape = (channels, size, size)
        self.decoder = torch.nn.Linear(z_dim, channels * size * size)
        self.net = torch.nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.bridge = VPBridge()

    def loss(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor, seed: int) -> torch.Tensor:
        x_T = self.decoder(z).view(-1, *self.shape)
        table = bridge_table(self.bridge, t)
        _, x_in = bridge_input(x0, x_T, table, seed)
        F = self.net(torch.cat([x_in, x_T], dim=1))
        return bridge_loss(F, x0, x_T, table, seed).loss


@pytest.mark.parametrize("dispatch", ["reference", "auto"])
def test_training_step_compiles_without_graph_breaks(monkeypatch, dispatch):
    """fullgraph=True raises on any graph break. The aot_eager backend runs Dynamo and
    AOTAutograd (which decomposes the ops into their kernels or reference ops) without
    inductor's code generation, which would take most of this file's time budget on a CPU.
    On the CPU the traced ops take the reference path in both settings (interpreted kernels
    are not traceable), so the compiled step must equal the eager reference step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyAutoencoder(channels=3, size=8, z_dim=4)
    params = list(model.parameters())
    x0, z = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 4)
    t = model.bridge.sample_t(3, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model.loss, fullgraph=True, backend="aot_eager")
    for seed in (5, 6):  # a second seed: the seed becomes a dynamic int, still no break
        monkeypatch.setenv(backend.ENV_VAR, dispatch)
        loss = compiled(x0, z, t, seed)
        grads = torch.autograd.grad(loss, params)
        monkeypatch.setenv(backend.ENV_VAR, "reference")
        eager = model.loss(x0, z, t, seed)
        torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
        for g, e in zip(grads, torch.autograd.grad(eager, params)):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6 * float(e.abs().max()))
