"""Total correlation of the aggregate posterior q(z), estimated on a minibatch (DBAE+TC).

For the stochastic encoder q(z|x) = N(mu(x), diag(sig(x)^2)) the aggregate posterior is
q(z) = E_x q(z|x), and its total correlation is

    TC = KL(q(z) || prod_k q(z_k)) = E_q(z)[ log q(z) - sum_k log q(z_k) ].

Minibatch-weighted sampling (beta-TCVAE, Chen et al. 2018): with the batch's samples
z_i ~ q(z|x_i), every density is replaced by a mixture over the batch,

    log q(z_i)   ~ logsumexp_j log q(z_i | x_j)     - log(N M)
    log q(z_ik)  ~ logsumexp_j log q(z_ik | x_j,k)  - log(N M)

(M the batch size, N the data set size), and TC ~ mean_i [log q(z_i) - sum_k log q(z_ik)].
The normaliser only shifts the estimate by the constant (d - 1) log(N M) - it never
changes a gradient. By default (``dataset_size=None``) this module uses N = 1, i.e. the
batch itself stands for the data distribution: log q(z_i) ~ logsumexp_j(...) - log M.
That choice makes the value a consistent estimate of TC (it converges to the true TC as
M grows, since 1/M sum_j q(z|x_j) is then an average of i.i.d. terms whose mean is q(z);
the i = j term adds a bias of order 1/M), so the number logged during training can be
read as nats of total correlation. Pass ``dataset_size=N`` for beta-TCVAE's value.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_density(z: Tensor, mu: Tensor, sig: Tensor) -> Tensor:
    """Elementwise log N(z; mu, sig^2) (broadcasting), in the dtype of the inputs."""
    return -0.5 * (((z - mu) / sig) ** 2 + _LOG_2PI) - torch.log(sig)


def total_correlation(z: Tensor, mu: Tensor, sig: Tensor, *, dataset_size: int | None = None) -> Tensor:
    """Minibatch-weighted estimate of TC(q(z)) in nats (a differentiable scalar).

    ``z``, ``mu``, ``sig``: (M, d); ``z[i]`` is a sample of q(z | x_i) = N(mu[i], sig[i]^2).
    Computed in float32 at least. Memory: an (M, M, d) tensor. ``dataset_size``: see the
    module docstring (None: the batch is the data distribution).
    """
    if z.dim() != 2 or mu.shape != z.shape or sig.shape != z.shape:
        raise ValueError(f"z, mu and sig must all have shape (M, d); got {tuple(z.shape)}, "
                         f"{tuple(mu.shape)}, {tuple(sig.shape)}")
    M, d = z.shape
    if M < 2:
        raise ValueError("the total-correlation estimate needs a batch of at least 2")
    if dataset_size is not None and dataset_size < 1:
        raise ValueError(f"dataset_size must be positive, got {dataset_size}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    z, mu, sig = z.to(dtype), mu.to(dtype), sig.to(dtype)
    # log q(z_ik | x_j) for every pair (i, j) and dimension k: (M, M, d)
    log_qzx = gaussian_log_density(z[:, None, :], mu[None, :, :], sig[None, :, :])
    log_norm = math.log(M) + (math.log(dataset_size) if dataset_size is not None else 0.0)
    log_qz = torch.logsumexp(log_qzx.sum(dim=2), dim=1) - log_norm  # joint, (M,)
    log_qz_marginals = (torch.logsumexp(log_qzx, dim=1) - log_norm).sum(dim=1)  # product of marginals, (M,)
    return (log_qz - log_qz_marginals).mean()


def gaussian_total_correlation(cov: Tensor) -> Tensor:
    """Exact TC of a Gaussian with covariance ``cov`` (d, d), in nats:
    0.5 (sum_k log cov_kk - log det cov). Zero exactly when ``cov`` is diagonal."""
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(cov.shape)}")
    return 0.5 * (torch.log(torch.diagonal(cov)).sum() - torch.logdet(cov))
