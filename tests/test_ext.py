"""The C++ extension dbae._C (float64 sampler scalars) against the reference VPBridge."""

from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dbae import _ext
from dbae.bridge import BridgeConfig, VPBridge, karras_grid

REFERENCE_ONLY = os.environ.get("DBAE_KERNELS", "auto").lower() == "reference"

CONFIGS = [
    BridgeConfig(),
    BridgeConfig(beta_d=1.0, beta_min=0.2, T=0.8, t_min=1e-3, start_offset=1e-3, rho=5.0),
    BridgeConfig(beta_d=19.9, beta_min=0.1, T=1.0, t_min=1e-5, start_offset=1e-4, rho=7.0),
]


def _args(c: BridgeConfig):
    return (c.beta_d, c.beta_min, c.T, c.t_min, c.start_offset, c.rho)


@pytest.fixture(scope="module")
def C():
    if REFERENCE_ONLY:
        # the loader must honour the switch; the module itself may still be importable
        assert _ext.C is None
        return pytest.importorskip("dbae._C")
    return importlib.import_module("dbae._C")


def test_extension_is_loaded():
    if REFERENCE_ONLY:
        assert _ext.C is None
    else:
        assert _ext.C is not None, "dbae._C was not built/installed (set DBAE_KERNELS=reference to opt out)"
        assert hasattr(_ext.C, "karras_grid") and hasattr(_ext.C, "drift_coefficients")


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "short", "beta20"])
def test_karras_grid_matches_reference(C, cfg):
    for n in list(range(1, 30)) + [50, 100, 257]:
        got = C.karras_grid(n, *_args(cfg))
        ref = karras_grid(n, cfg)
        assert isinstance(got, list) and len(got) == len(ref) == n + 1
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
        assert got[-1] == 0.0 and got[0] == pytest.approx(cfg.T - cfg.start_offset, rel=1e-15)
        if n > 1:
            assert got[-2] == cfg.t_min


@pytest.mark.parametrize("mode", ["ode", "sde"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "short", "beta20"])
def test_drift_coefficients_match_reference(C, cfg, mode):
    rng = np.random.default_rng(17)
    ts = np.concatenate([
        rng.uniform(0.0, cfg.T, 500),
        cfg.T * 10.0 ** rng.uniform(-7, -1, 100),  # near 0
        cfg.T * (1 - 10.0 ** rng.uniform(-7, -1, 100)),  # near T
        karras_grid(40, cfg)[:-1],
    ])
    ts = ts[(ts > 0) & (ts < cfg.T)]
    got = np.array(C.drift_coefficients(ts.tolist(), 0 if mode == "ode" else 1, 1.0, *_args(cfg)))
    assert got.shape == (len(ts), 4)
    ref = np.stack([k.numpy() for k in VPBridge(cfg).drift_coefficients(torch.tensor(ts, dtype=torch.float64), mode)], 1)
    assert np.isfinite(got).all()
    # Near T the coefficients contain 1/(1 - rho(t)) with 1 - rho = -expm1(logsnr(T) - logsnr(t)),
    # a difference of O(1) numbers: its condition number grows like T/(T - t), so any two float64
    # implementations (torch vs libm exp/log/expm1) may differ by ~1e-16 T/(T - t) there.
    rtol = 1e-12 + 1e-15 * cfg.T / (cfg.T - ts)
    scale = np.abs(ref[:, :3]).max(1)
    for j, name in enumerate(("k_x", "k_D", "k_T", "g")):
        if mode == "sde" and name == "k_T":
            # analytically zero with w = 1 (SPEC 11): both are round-off of a cancellation
            assert (np.abs(got[:, j]) <= 1e3 * rtol * scale).all()
            assert (np.abs(got[:, j] - ref[:, j]) <= 1e3 * rtol * scale).all()
        else:
            err = np.abs(got[:, j] - ref[:, j])
            bad = err > rtol * np.abs(ref[:, j])
            assert not bad.any(), (name, ts[bad], got[bad, j], ref[bad, j])
    # away from T the plain 1e-12 relative agreement holds for every coefficient
    away = (cfg.T - ts) > 1e-3
    cols = [0, 1, 3] if mode == "sde" else [0, 1, 2, 3]
    np.testing.assert_allclose(got[away][:, cols], ref[away][:, cols], rtol=1e-12, atol=0)


def test_drift_coefficients_w(C):
    """w weights the h-score: the coefficients are affine in w, and w is honoured."""
    ts = [0.1, 0.5, 0.9]
    rows = {w: np.array(C.drift_coefficients(ts, 0, w, *_args(CONFIGS[0]))) for w in (0.0, 1.0, 2.5)}
    np.testing.assert_allclose(rows[2.5], rows[0.0] + 2.5 * (rows[1.0] - rows[0.0]), rtol=1e-10)
    ref = VPBridge().drift_coefficients(torch.tensor(ts, dtype=torch.float64), "ode", w=2.5)
    np.testing.assert_allclose(rows[2.5], np.stack([k.numpy() for k in ref], 1), rtol=1e-12)
    # w changes k_x and k_T, never k_D or g
    assert not np.allclose(rows[0.0][:, 0], rows[1.0][:, 0])
    np.testing.assert_array_equal(rows[0.0][:, 1], rows[1.0][:, 1])
    np.testing.assert_array_equal(rows[0.0][:, 3], rows[1.0][:, 3])


@pytest.mark.parametrize("n", [0, -1, -100])
def test_karras_grid_invalid_n(C, n):
    with pytest.raises(ValueError):
        C.karras_grid(n, *_args(CONFIGS[0]))


@pytest.mark.parametrize("t", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf, -math.inf])
def test_drift_coefficients_invalid_t(C, t):
    for mode in (0, 1):
        with pytest.raises(ValueError):
            C.drift_coefficients([t], mode, 1.0, *_args(CONFIGS[0]))
        # one bad value anywhere in the list is enough
        with pytest.raises(ValueError):
            C.drift_coefficients([0.5, t, 0.2], mode, 1.0, *_args(CONFIGS[0]))


@pytest.mark.parametrize("mode", [2, -1, 7])
def test_drift_coefficients_invalid_mode(C, mode):
    with pytest.raises(ValueError):
        C.drift_coefficients([0.5], mode, 1.0, *_args(CONFIGS[0]))


def test_empty_list(C):
    assert list(C.drift_coefficients([], 0, 1.0, *_args(CONFIGS[0]))) == []


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("readelf") is None, reason="needs Linux and readelf")
def test_ops_library_uses_the_shared_cxx_runtime():
    """_ops.so must not carry its own copy of libstdc++ (some g++ wrappers add -static-libstdc++):
    that copy's iostreams crash the process when an op formats an error message."""
    from dbae._ext import ops_library_path

    path = ops_library_path()
    if path is None:
        pytest.skip("_ops.so was not built")
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, dynamic
