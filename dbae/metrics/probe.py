"""Linear probes on frozen latents (SPEC 10; paper Appendix C.2, "Downstream Inference",
following the DiTi protocol of Yue et al. 2024).

- Classification: one logistic regression per binary attribute (a 40-way multi-label
  problem for CelebA), fitted jointly by full-batch L-BFGS on z standardised with the
  training statistics. The objective is scikit-learn's ``LogisticRegression(C=C)``:
      min_{W, b} 1/2 |W|^2 + C sum_i sum_a log(1 + exp(-s_ia (w_a . z_i + b_a))),  s = 2y - 1,
  (no penalty on the bias). The score is the average precision (AP) of each attribute on
  the test split and their mean (mAP).
- AP (area under the precision-recall curve, as ``sklearn.metrics.average_precision_score``):
      AP = sum_n (R_n - R_{n-1}) P_n
  over the distinct score thresholds in decreasing order (tied scores form one threshold).
- Regression: least squares (optional ridge) from standardised z to targets standardised
  with the training statistics; per target the Pearson r between prediction and truth on
  the test split and the MSE in standardised units (so that MSE = 1 is the constant
  predictor's error), and their means over targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DataError

Tensor = torch.Tensor


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds; NaN when no positive."""
    scores, labels = scores.double().flatten(), labels.flatten()
    if scores.shape != labels.shape:
        raise DataError(f"{scores.numel()} scores but {labels.numel()} labels")
    positive = labels > 0.5
    n_pos = int(positive.sum())
    if n_pos == 0:
        return math.nan
    order = torch.argsort(scores, descending=True, stable=True)
    s, p = scores[order], positive[order].double()
    tp = p.cumsum(0)
    # last index of each run of equal scores: a threshold takes the whole tie
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp = tp[last]
    predicted = torch.arange(1, s.numel() + 1, dtype=torch.float64)[last]
    precision = tp / predicted
    recall = tp / n_pos
    recall_prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - recall_prev) * precision).sum())


@dataclass(frozen=True)
class Standardizer:
    """Per-column mean and std of training data; ``apply`` maps x to (x - mean) / std."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, x: Tensor) -> "Standardizer":
        x = x.double()
        return cls(x.mean(0), x.std(0, unbiased=False).clamp(min=1e-12))

    def apply(self, x: Tensor) -> Tensor:
        return (x.double() - self.mean) / self.std


def _check(z: Tensor, y: Tensor, what: str) -> None:
    if z.ndim != 2 or y.ndim != 2 or z.shape[0] != y.shape[0]:
        raise DataError(f"{what}: latents (n, d) and targets (n, k) must have the same n, "
                        f"got {tuple(z.shape)} and {tuple(y.shape)}")
    if z.shape[0] < 2:
        raise DataError(f"{what}: need at least 2 samples, got {z.shape[0]}")


def fit_logistic(z: Tensor, y: Tensor, C: float = 1.0, max_iter: int = 500, tol: float = 1e-9) -> tuple[Tensor, Tensor]:
    """Weights (k, d) and biases (k,) of k independent logistic regressions on features z
    (n, d) (used as given) with binary targets y (n, k), minimising scikit-learn's
    objective 1/2 |w|^2 + C sum_i logloss (float64 full-batch L-BFGS)."""
    _check(z, y, "logistic regression")
    x = z.double()
    t = (y > 0.5).double()
    k, d = t.shape[1], x.shape[1]
    w = torch.zeros(k, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=20, line_search_fn="strong_wolfe")
    n = x.shape[0]

    def closure() -> Tensor:
        opt.zero_grad()
        logits = x @ w.T + b
        # divided by C * n for conditioning; same minimiser as 1/2|w|^2 + C * sum logloss
        loss = (F.binary_cross_entropy_with_logits(logits, t, reduction="sum") + 0.5 / C * w.square().sum()) / n
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def classification_probe(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor,
                         C: float = 1.0, max_iter: int = 500,
                         names: list[str] | tuple[str, ...] | None = None) -> dict[str, object]:
    """Multi-label logistic probe: standardise z with training statistics, fit, score the
    test split. Returns ``{"ap": [per attribute], "map": mean over attributes with a test
    positive, "accuracy": [per attribute]}``."""
    _check(z_train, y_train, "classification probe (train)")
    _check(z_test, y_test, "classification probe (test)")
    pos = (y_train > 0.5).sum(0)
    constant = ((pos == 0) | (pos == y_train.shape[0])).nonzero().flatten().tolist()
    if constant:
        shown = ", ".join(repr(names[c]) if names is not None else f"column {c}" for c in constant)
        raise DataError(f"attribute(s) {shown} takes one value on every training sample: "
                        "the probe cannot learn them; use more samples or leave them out")
    scaler = Standardizer.fit(z_train)
    w, b = fit_logistic(scaler.apply(z_train), y_train, C=C, max_iter=max_iter)
    logits = scaler.apply(z_test) @ w.T + b
    ap = [average_precision(logits[:, a], y_test[:, a]) for a in range(y_test.shape[1])]
    acc = ((logits > 0) == (y_test > 0.5)).double().mean(0).tolist()
    finite = [v for v in ap if not math.isnan(v)]
    return {"ap": ap, "map": sum(finite) / len(finite) if finite else math.nan, "accuracy": acc}


def pearson_r(pred: Tensor, target: Tensor) -> Tensor:
    """Pearson correlation per column of (n, k) predictions and targets (NaN for a constant column)."""
    p = pred.double() - pred.double().mean(0)
    t = target.double() - target.double().mean(0)
    return (p * t).sum(0) / (p.square().sum(0).sqrt() * t.square().sum(0).sqrt())


def regression_probe(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor,
                     ridge: float = 0.0) -> dict[str, object]:
    """Linear regression probe (least squares, ``ridge`` * n * |W|^2 added when > 0) from
    standardised z to standardised targets. Returns per-target and mean ``pearson_r``
    and ``mse`` (standardised units) on the test split."""
    _check(z_train, y_train, "regression probe (train)")
    _check(z_test, y_test, "regression probe (test)")
    zs = Standardizer.fit(z_train)
    ys = Standardizer.fit(y_train)
    x = torch.cat([zs.apply(z_train), torch.ones(z_train.shape[0], 1, dtype=torch.float64)], 1)
    t = ys.apply(y_train)
    if ridge > 0:
        reg = ridge * x.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
        reg[-1, -1] = 0.0  # no penalty on the intercept
        coef = torch.linalg.solve(x.T @ x + reg, x.T @ t)
    else:
        coef = torch.linalg.lstsq(x, t, driver="gelsd").solution
    xt = torch.cat([zs.apply(z_test), torch.ones(z_test.shape[0], 1, dtype=torch.float64)], 1)
    pred = xt @ coef
    truth = ys.apply(y_test)
    r = pearson_r(pred, truth)
    mse = (pred - truth).square().mean(0)
    return {"pearson_r": r.tolist(), "mse": mse.tolist(),
            "mean_pearson_r": float(r.nanmean()), "mean_mse": float(mse.mean())}
