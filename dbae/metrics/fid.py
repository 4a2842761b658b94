"""Generation metrics from network features (SPEC 10; paper Appendix C.2).

- FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
  local Nash equilibrium"): the Fréchet distance between Gaussians fitted to the real and
  generated features,
      FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)).
  The trace of the matrix square root is computed stably as
  Tr((S_r S_g)^(1/2)) = sum_i sqrt(lambda_i(S_r^(1/2) S_g S_r^(1/2))), a symmetric PSD
  eigenproblem (S_r S_g is similar to S_r^(1/2) S_g S_r^(1/2)), in float64; no scipy needed.
  Covariances are unbiased (divide by n - 1), as in pytorch-fid and clean-fid.
- Precision / Recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric for
  assessing generative models"), k-NN manifold estimate with k = 3 as in the paper's
  evaluator (guided-diffusion): a sample lies on the manifold of a set when it is within
  the distance from some member of the set to that member's k-th nearest neighbour (self
  excluded). Precision = share of generated samples on the real manifold; recall = share
  of real samples on the generated manifold.
- Inception Score (Salimans et al. 2016, "Improved techniques for training GANs"):
  IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the split; averaged over
  ``splits`` equal splits (mean and standard deviation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DataError

Tensor = torch.Tensor


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64."""

    mean: Tensor
    cov: Tensor
    n: int


def feature_stats(features: Tensor) -> GaussianStats:
    """Mean and unbiased covariance of features (n, D), n >= 2."""
    if features.ndim != 2:
        raise DataError(f"features must be (n, D), got {tuple(features.shape)}")
    n = features.shape[0]
    if n < 2:
        raise DataError(f"FID needs at least 2 feature vectors per set, got {n}")
    f = features.double()
    mean = f.mean(0)
    centred = f - mean
    return GaussianStats(mean, centred.T @ centred / (n - 1), n)


def _sqrt_psd(a: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((a + a.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def trace_sqrt_product(s1: Tensor, s2: Tensor) -> float:
    """Tr((s1 s2)^(1/2)) for symmetric PSD s1, s2 (float64 eigendecomposition)."""
    r = _sqrt_psd(s1.double())
    m = r @ s2.double() @ r
    vals = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(vals.clamp(min=0).sqrt().sum())


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)); clipped at 0 (round-off)."""
    if a.mean.shape != b.mean.shape:
        raise DataError(f"feature dimensions differ: {a.mean.shape[0]} and {b.mean.shape[0]}")
    diff = a.mean - b.mean
    value = float(diff @ diff) + float(torch.trace(a.cov) + torch.trace(b.cov)) - 2.0 * trace_sqrt_product(a.cov, b.cov)
    return max(value, 0.0)


def fid(real: Tensor, fake: Tensor) -> float:
    """FID between two feature sets (n, D) and (m, D)."""
    return frechet_distance(feature_stats(real), feature_stats(fake))


def _kth_neighbour_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    if x.shape[0] <= k:
        raise DataError(f"precision/recall with k={k} needs more than {k} samples per set, got {x.shape[0]}")
    radii = []
    for block in x.split(chunk):
        d = torch.cdist(block, x)
        # the k+1 smallest include the point itself (distance 0)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _on_manifold(points: Tensor, support: Tensor, radii: Tensor, chunk: int) -> Tensor:
    inside = []
    for block in points.split(chunk):
        inside.append((torch.cdist(block, support) <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets (n, D), (m, D)."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DataError(f"feature sets must be (n, D) and (m, D), got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    real, fake = real.double(), fake.double()
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    precision = _on_manifold(fake, real, real_radii, chunk).double().mean().item()
    recall = _on_manifold(real, fake, fake_radii, chunk).double().mean().item()
    return {"precision": precision, "recall": recall}


def inception_score(logits: Tensor, splits: int = 1) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E_x KL(p(y|x) || p(y))) from logits (n, K)."""
    if logits.ndim != 2:
        raise DataError(f"logits must be (n, K), got {tuple(logits.shape)}")
    if splits < 1 or logits.shape[0] < splits:
        raise DataError(f"cannot split {logits.shape[0]} samples into {splits} parts")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part in log_p.tensor_split(splits):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)
        scores.append(math.exp(float(kl.mean())))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if splits > 1 else 0.0
