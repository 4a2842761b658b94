"""TAD and ATTRS (SPEC 10; paper Appendix C.2, "Disentanglement"), the Total AUROC
Difference of Yeats et al. 2022 (NashAE), as implemented in the evaluation code the paper
uses (InfoDiffusion's ``TADMetric``, from github.com/ericyeats/nashae-beamsynthesis).

For latents z (n, d) and binary attributes y (n, A):

1. AUROC_{a,j} = max(AUROC(y_a, z_j), AUROC(y_a, -z_j)): sweeping a threshold over
   dimension j (either direction) as a detector of attribute a. Computed exactly by the
   Mann-Whitney rank statistic with tied values counted one half (= scikit-learn's
   ``roc_auc_score``).
2. Entangled attributes are dropped: with I(a; b) the mutual information of two binary
   attributes (natural log) and H(a) = I(a; a) the entropy, attribute a is kept when its
   largest entropy reduction by another attribute, max_{b != a} I(a; b) / H(a), is at most
   0.2. Attributes that never vary (H = 0) are dropped too.
3. An attribute is *captured* when max_j AUROC_{a,j} >= 0.75. ATTRS = number of kept,
   captured attributes;
       TAD = sum over kept, captured a of (max_j AUROC_{a,j} - second largest_j AUROC_{a,j}).
"""

from __future__ import annotations

import math

import torch

from ..errors import DataError

Tensor = torch.Tensor

AUROC_THRESHOLD = 0.75
ENTROPY_REDUCTION_THRESHOLD = 0.2


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of each column of x (n, d), ties getting their average rank."""
    n = x.shape[0]
    order = x.argsort(dim=0, stable=True)
    sorted_x = x.gather(0, order)
    ranks = torch.empty_like(x, dtype=torch.float64)
    positions = torch.arange(1, n + 1, dtype=torch.float64)
    for j in range(x.shape[1]):
        col = sorted_x[:, j]
        new_group = torch.ones(n, dtype=torch.bool)
        new_group[1:] = col[1:] != col[:-1]
        group = new_group.cumsum(0) - 1
        counts = torch.bincount(group)
        sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, group, positions)
        ranks[order[:, j], j] = (sums / counts)[group]
    return ranks


def auroc_matrix(z: Tensor, y: Tensor) -> Tensor:
    """(A, d) AUROC of each latent dimension as a detector of each binary attribute,
    folded to max(AUROC, 1 - AUROC); 0.5 for an attribute that never varies."""
    if z.ndim != 2 or y.ndim != 2 or z.shape[0] != y.shape[0]:
        raise DataError(f"latents (n, d) and attributes (n, A) must have the same n, got {tuple(z.shape)} "
                        f"and {tuple(y.shape)}")
    ranks = _average_ranks(z.double())
    pos = y > 0.5
    out = torch.full((y.shape[1], z.shape[1]), 0.5, dtype=torch.float64)
    for a in range(y.shape[1]):
        n1 = int(pos[:, a].sum())
        n0 = y.shape[0] - n1
        if n1 == 0 or n0 == 0:
            continue
        u = ranks[pos[:, a]].sum(0) - n1 * (n1 + 1) / 2
        auc = u / (n1 * n0)
        out[a] = torch.maximum(auc, 1 - auc)
    return out


def mutual_information_matrix(y: Tensor) -> Tensor:
    """(A, A) mutual information (nats) between binary attributes; the diagonal is H(a)."""
    t = (y > 0.5).double()
    n = t.shape[0]
    both = [t, 1 - t]
    mi = torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64)
    for u in both:
        for v in both:
            joint = u.T @ v / n
            prod = u.mean(0)[:, None] * v.mean(0)[None, :]
            term = joint * torch.log(joint / prod)
            mi += torch.where(joint > 0, term, torch.zeros_like(term))
    return mi


def entropy_reduction(y: Tensor) -> Tensor:
    """(A,) max_{b != a} I(a; b) / H(a); NaN where H(a) = 0."""
    mi = mutual_information_matrix(y)
    h = mi.diag().clone()
    off = mi - torch.diag(h)
    best = off.max(dim=1).values if mi.shape[0] > 1 else torch.zeros_like(h)
    return torch.where(h > 0, best / h.where(h > 0, torch.ones_like(h)), torch.full_like(h, math.nan))


def tad(z: Tensor, y: Tensor, names: list[str] | tuple[str, ...] | None = None,
        auroc_threshold: float = AUROC_THRESHOLD,
        entropy_threshold: float = ENTROPY_REDUCTION_THRESHOLD) -> dict[str, object]:
    """TAD and ATTRS of latents z (n, d) for binary attributes y (n, A) (see the module notes).

    Returns ``{"tad", "attrs", "per_attribute": {name: {"best_auroc", "second_auroc",
    "best_dim", "entropy_reduction", "kept", "captured"}}}``."""
    if z.shape[1] < 2:
        raise DataError("TAD compares the two best latent dimensions: z needs at least 2 dimensions")
    if names is None:
        names = [f"attr{a}" for a in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise DataError(f"{len(names)} attribute names for {y.shape[1]} attribute columns")
    aur = auroc_matrix(z, y)
    top = aur.topk(2, dim=1)
    reduction = entropy_reduction(y)
    kept = reduction <= entropy_threshold  # NaN (constant attribute) compares False
    captured = top.values[:, 0] >= auroc_threshold
    selected = kept & captured
    diffs = top.values[:, 0] - top.values[:, 1]
    per = {
        name: {
            "best_auroc": float(top.values[a, 0]), "second_auroc": float(top.values[a, 1]),
            "best_dim": int(top.indices[a, 0]), "entropy_reduction": float(reduction[a]),
            "kept": bool(kept[a]), "captured": bool(selected[a]),
        }
        for a, name in enumerate(names)
    }
    return {"tad": float(diffs[selected].sum()), "attrs": int(selected.sum()), "per_attribute": per}
