import math

import numpy as np
import pytest
import torch

from dbae.metrics import mse, psnr, ssim, summarize


def _images(seed=0, shape=(3, 3, 32, 40)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64)


def test_identical_images():
    x = _images()
    assert torch.all(mse(x, x) == 0)
    assert torch.all(torch.isinf(psnr(x, x)))
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_mse_hand_computed_and_psnr_of_known_mse():
    x = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    assert mse(x, y).tolist() == pytest.approx([(0.01 + 0.04 + 0.09 + 0.16) / 4, 0.25])
    assert psnr(x, y)[1].item() == pytest.approx(10 * math.log10(1 / 0.25))
    assert psnr(x, y, data_range=255)[1].item() == pytest.approx(10 * math.log10(255**2 / 0.25))


def test_ssim_decreases_with_noise():
    x = _images(1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scores = [ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.01, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert scores[0] < 1


def test_ssim_on_images_smaller_than_the_window():
    x, y = _images(3, (2, 3, 5, 8)), _images(4, (2, 3, 5, 8))
    s = ssim(x, y)
    assert s.shape == (2,) and torch.all(s.abs() <= 1)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        mse(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        ssim(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4))


def test_summarize_skips_infinite_psnr():
    x = _images(5, (2, 3, 16, 16))
    y = x.clone()
    y[1] = (y[1] + 0.1).clamp(0, 1)
    out = summarize(x, y)
    assert set(out) == {"mse", "psnr", "ssim"}
    assert out["psnr"] == pytest.approx(psnr(x[1:], y[1:]).item())
    assert out["mse"] == pytest.approx(mse(x, y).mean().item())
    assert summarize(x, x)["psnr"] == math.inf


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x = _images(6, (2, 3, 33, 47))
    y = (x + 0.2 * _images(7, (2, 3, 33, 47)) - 0.1).clamp(0, 1)
    ours = ssim(x.float(), y.float())
    for i in range(2):
        ref = metrics.structural_similarity(
            x[i].float().numpy().astype(np.float64),
            y[i].float().numpy().astype(np.float64),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
            channel_axis=0,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)
