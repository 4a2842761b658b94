"""Attribute labels and linear attribute models on normalized z (SPEC 8).

Labels come from one of two places:

- the built-in shapes data (:func:`shapes_labels`): every discrete factor becomes one
  binary one-vs-rest attribute per value, named ``factor=value`` (``colour=red``,
  ``shape=circle``, ...), and every continuous factor (``size``, ``x``, ``y``,
  ``rotation``, ``background``) stays one continuous attribute;
- a CelebA-style attribute file (:func:`read_attribute_file`, the ``list_attr_celeba.txt``
  format) next to a folder of images: binary attributes with values -1/1 (or 0/1).

The model is linear on the normalized latent zn = (z - mean) / std (mean and std per
dimension over the classifier's training images): a logistic regression for a binary
attribute (class-balanced: both classes weigh half of the loss, so a rare attribute
still gets a meaningful direction), a ridge regression on the standardized target for a
continuous one. The manipulation direction of an attribute is its weight row, which
points to more of the attribute (higher probability, or larger value).

Classifiers are stored as safetensors (tensors) plus JSON metadata, never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ..data.attributes import read_attribute_table
from ..data.shapes import FACTORS, ShapesDataset, render
from ..errors import CheckpointError, ConfigError, DataError
from ..imageio import load_images
from ..model import DBAE
from ..prior.identity import AutoencoderRef, check_same_autoencoder
from ..checkpoints import read_tagged_safetensors, write_safetensors

Tensor = torch.Tensor

BINARY = "binary"
CONTINUOUS = "continuous"
FORMAT = "dbae-attribute-classifier/1"


@dataclass(frozen=True)
class AttributeLabels:
    """Labels of ``n`` images for ``k`` attributes."""

    names: tuple[str, ...]
    kinds: tuple[str, ...]  # BINARY (values 0/1) or CONTINUOUS, one per name
    values: Tensor  # (n, k) float32

    def __post_init__(self) -> None:
        if len(self.names) != len(self.kinds) or self.values.dim() != 2 or self.values.shape[1] != len(self.names):
            raise ValueError("names, kinds and the columns of values must agree")

    def select(self, names: Sequence[str]) -> "AttributeLabels":
        """Only the attributes ``names`` (in that order); unknown names raise DataError."""
        cols = [attribute_index(self.names, n) for n in names]
        return AttributeLabels(tuple(names), tuple(self.kinds[c] for c in cols), self.values[:, cols])


def attribute_index(names: Sequence[str], name: str) -> int:
    """Position of ``name`` in ``names``; DataError listing the known names otherwise."""
    try:
        return list(names).index(name)
    except ValueError:
        shown = ", ".join(names) if len(names) <= 60 else ", ".join(names[:60]) + ", ..."
        raise DataError(f"unknown attribute {name!r}; known attributes: {shown}") from None


# ----- labels from the built-in shapes factors -----
def shapes_attribute_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names, kinds) of the attributes derived from the shapes factors."""
    names, kinds = [], []
    for f in FACTORS:
        if f.discrete:
            names += [f"{f.name}={v}" for v in f.values]
            kinds += [BINARY] * len(f.values)
        else:
            names.append(f.name)
            kinds.append(CONTINUOUS)
    return tuple(names), tuple(kinds)


def shapes_labels(factors: Tensor) -> AttributeLabels:
    """Attribute labels (see :func:`shapes_attribute_names`) of factor vectors (n, n_factors)."""
    columns = []
    for k, f in enumerate(FACTORS):
        if f.discrete:
            index = factors[:, k].round().long()
            columns += [(index == i).float() for i in range(len(f.values))]
        else:
            columns.append(factors[:, k].float())
    names, kinds = shapes_attribute_names()
    return AttributeLabels(names, kinds, torch.stack(columns, dim=1))


def shapes_binary_labels(factors: Tensor) -> AttributeLabels:
    """Binary attributes only, for TAD: the one-vs-rest attributes of the discrete factors,
    then each continuous factor binarised at the middle of its range (``size>0.35``, ...)."""
    labels = shapes_labels(factors)
    keep = [i for i, k in enumerate(labels.kinds) if k == BINARY]
    names, cols = [labels.names[i] for i in keep], [labels.values[:, i] for i in keep]
    for k, f in enumerate(FACTORS):
        if not f.discrete:
            mid = (f.low + f.high) / 2
            names.append(f"{f.name}>{mid:.3g}")
            cols.append((factors[:, k] > mid).float())
    return AttributeLabels(tuple(names), (BINARY,) * len(names), torch.stack(cols, 1))


def shapes_images(image_size: int, n: int, seed: int, split: str, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches (images, factors) of the first ``n`` items of the shapes split."""
    data = ShapesDataset(image_size=image_size, length=max(n, 1), seed=seed, split=split)
    for start in range(0, n, batch_size):
        factors = data.factors_at(range(start, min(n, start + batch_size)))
        yield render(factors, image_size), factors


# ----- labels from a CelebA-style attribute file -----
@dataclass(frozen=True)
class AttributeFile:
    """The parsed file: one row per image, ``files`` relative to the image folder."""

    files: tuple[str, ...]
    labels: AttributeLabels  # binary, 0/1


def read_attribute_file(path: Path, limit: int | None = None) -> AttributeFile:
    """Parse a ``list_attr_celeba.txt``-style file: line 1 the number of images, line 2
    the attribute names, then ``filename v1 ... vk`` per image with values -1/1 (0/1 is
    accepted too; 1 means the attribute is present). ``limit``: read only the first rows.
    The parser is :func:`dbae.data.attributes.read_attribute_table`."""
    table = read_attribute_table(path, limit)
    labels = AttributeLabels(table.names, (BINARY,) * len(table.names), table.values)
    return AttributeFile(table.files, labels)


def attribute_file_images(
    table: AttributeFile, image_dir: Path, image_size: int, *, resize: bool, batch_size: int = 64
) -> Iterator[Tensor]:
    """Batches of the images of ``table`` from ``image_dir`` (checked to exist up front).
    Without ``resize`` every image must already be image_size x image_size."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    paths = [image_dir / f for f in table.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} image(s) listed in the attribute file are missing: "
                        f"{', '.join(missing[:3])}{more}")
    for start in range(0, len(paths), batch_size):
        yield load_images(paths[start:start + batch_size], image_size, exact_size=not resize)


@torch.no_grad()
def encode_all(model: DBAE, batches: Iterable[Tensor]) -> Tensor:
    """Encoder means z (n, d) of a stream of image batches, on the CPU in float32."""
    device = next(model.parameters()).device
    out = [model.encode(x.to(device)).float().cpu() for x in batches]
    if not out:
        raise DataError("no images to encode")
    return torch.cat(out)


def encode_shapes(model: DBAE, n: int, seed: int, split: str, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(z (n, d), factors (n, k)) of the first ``n`` items of a shapes split, encoded in
    batches of ``batch_size`` (:func:`shapes_images`, :func:`encode_all`)."""
    size = model.config.image_size
    zs, factors = [], []
    for x, f in shapes_images(size, n, seed, split, batch_size):
        zs.append(encode_all(model, [x]))
        factors.append(f)
    return torch.cat(zs), torch.cat(factors)


# ----- the classifier -----
@dataclass
class AttributeClassifier:
    """Linear models of ``k`` attributes on normalized z (d dimensions).

    For a binary attribute, weight/bias give the logit; for a continuous one they give
    the standardized target, so value = target_mean + target_std * (zn @ w + b).
    """

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    weight: Tensor  # (k, d) float32, on normalized z
    bias: Tensor  # (k,)
    z_mean: Tensor  # (d,) mean of z over the training images
    z_std: Tensor  # (d,) std of z over the training images (clamped away from 0)
    target_mean: Tensor  # (k,) 0 for binary attributes
    target_std: Tensor  # (k,) 1 for binary attributes
    #: held-out quality per attribute: binary {"accuracy", "ap"}; continuous {"pearson_r", "r2"}
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: where the latents came from: checkpoint path and step, data description
    source: dict[str, object] = field(default_factory=dict)
    #: the autoencoder whose latents it was trained on (sha256 of its checkpoint and which weights);
    #: None for classifiers fitted in Python without one, or written before it was recorded
    autoencoder: AutoencoderRef | None = None

    @property
    def z_dim(self) -> int:
        return int(self.weight.shape[1])

    def index(self, name: str) -> int:
        return attribute_index(self.names, name)

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.z_mean.to(z)) / self.z_std.to(z)

    def denormalize(self, zn: Tensor) -> Tensor:
        return zn * self.z_std.to(zn) + self.z_mean.to(zn)

    def direction(self, name: str) -> Tensor:
        """Unit vector (d,) in normalized-z space towards more of attribute ``name``."""
        w = self.weight[self.index(name)]
        norm = w.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise DataError(f"attribute {name!r} has a zero direction (its classifier learned nothing)")
        return w / norm

    def predict(self, z: Tensor) -> Tensor:
        """(n, k): probabilities for binary attributes, values for continuous ones."""
        raw = self.normalize(z.float()) @ self.weight.T.to(z.device) + self.bias.to(z.device)
        binary = torch.tensor([k == BINARY for k in self.kinds], device=z.device)
        value = self.target_mean.to(z.device) + self.target_std.to(z.device) * raw
        return torch.where(binary, torch.sigmoid(raw), value)

    def check_model(self, model: DBAE, autoencoder: AutoencoderRef | None = None, source: Path | None = None) -> None:
        """ConfigError unless ``model``'s latents have this classifier's width; with
        ``autoencoder`` (the identity of the checkpoint the model came from), CheckpointError
        unless the classifier was trained on that checkpoint's latents (when it recorded one)."""
        if model.config.z_dim != self.z_dim:
            raise ConfigError(f"the classifier was trained on {self.z_dim}-dimensional latents but this model's "
                              f"z has {model.config.z_dim}; train a classifier for this checkpoint")
        if autoencoder is not None and self.autoencoder is not None:
            check_same_autoencoder(self.autoencoder, autoencoder, "the classifier", source or Path("(in memory)"),
                                   remedy="Train a classifier for this checkpoint (dbae train-classifier)")


def fit_classifier(
    z: Tensor,
    labels: AttributeLabels,
    *,
    z_val: Tensor | None = None,
    labels_val: AttributeLabels | None = None,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> AttributeClassifier:
    """Fit one linear model per attribute on normalized z (n, d); held-out metrics when
    ``z_val``/``labels_val`` are given. ``l2``: ridge penalty per sample on the weights."""
    z = z.float()
    n, d = z.shape
    if labels.values.shape[0] != n:
        raise ValueError(f"{n} latents but {labels.values.shape[0]} label rows")
    if n < 2:
        raise DataError("a classifier needs at least 2 labelled images")
    y = labels.values.float()
    binary = torch.tensor([k == BINARY for k in labels.kinds])
    for c, name in enumerate(labels.names):
        if binary[c]:
            pos = int(y[:, c].sum())
            if pos == 0 or pos == n:
                which = "absent from" if pos == 0 else "present in"
                raise DataError(f"attribute {name!r} is {which} all {n} training images: cannot learn it; "
                                "use more images or leave it out")
    z_mean, z_std = z.mean(0), z.std(0).clamp(min=1e-6)
    zn = (z - z_mean) / z_std
    k = len(labels.names)
    weight, bias = torch.zeros(k, d), torch.zeros(k)
    t_mean, t_std = torch.zeros(k), torch.ones(k)

    cont = (~binary).nonzero().flatten()
    if len(cont):
        yc = y[:, cont]
        t_mean[cont], t_std[cont] = yc.mean(0), yc.std(0).clamp(min=1e-8)
        target = (yc - t_mean[cont]) / t_std[cont]
        X = zn.double()
        Xc = X - X.mean(0)
        A = Xc.T @ Xc + l2 * n * torch.eye(d, dtype=torch.float64)
        W = torch.linalg.solve(A, Xc.T @ target.double())  # (d, kc)
        weight[cont] = W.T.float()
        bias[cont] = (target.double().mean(0) - X.mean(0) @ W).float()

    bins = binary.nonzero().flatten()
    if len(bins):
        yb = y[:, bins]
        pos_frac = yb.mean(0)
        sample_w = torch.where(yb > 0.5, 0.5 / pos_frac, 0.5 / (1 - pos_frac))  # class-balanced, mean 1
        W = torch.zeros(len(bins), d, requires_grad=True)
        b = torch.zeros(len(bins), requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            logits = zn @ W.T + b
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, yb, reduction="none")
                    * sample_w).mean(0).sum() + l2 * (W ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        weight[bins], bias[bins] = W.detach(), b.detach()

    clf = AttributeClassifier(labels.names, labels.kinds, weight, bias, z_mean, z_std, t_mean, t_std)
    if z_val is not None and labels_val is not None:
        clf.metrics = evaluate_classifier(clf, z_val, labels_val)
    return clf


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """Area under the precision-recall curve (mean precision at each positive)."""
    order = scores.argsort(descending=True)
    hits = positive[order].float()
    if hits.sum() == 0:
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def evaluate_classifier(clf: AttributeClassifier, z: Tensor, labels: AttributeLabels) -> dict[str, dict[str, float]]:
    """Held-out metrics per attribute (see :attr:`AttributeClassifier.metrics`)."""
    pred = clf.predict(z.float())
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(clf.names):
        target = labels.values[:, attribute_index(labels.names, name)]
        if clf.kinds[c] == BINARY:
            positive = target > 0.5
            out[name] = {"accuracy": float(((pred[:, c] > 0.5) == positive).float().mean()),
                         "ap": average_precision(pred[:, c], positive)}
        else:
            p, t = pred[:, c].double(), target.double()
            r = torch.corrcoef(torch.stack([p, t]))[0, 1]
            r2 = 1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum().clamp(min=1e-12)
            out[name] = {"pearson_r": float(r), "r2": float(r2)}
    return out


def save_classifier(path: Path, clf: AttributeClassifier) -> Path:
    """Write the classifier to a safetensors file (atomically)."""
    tensors = {
        "weight": clf.weight, "bias": clf.bias, "z_mean": clf.z_mean, "z_std": clf.z_std,
        "target_mean": clf.target_mean, "target_std": clf.target_std,
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "names": json.dumps(list(clf.names)),
        "kinds": json.dumps(list(clf.kinds)),
        "metrics": json.dumps(clf.metrics),
        "source": json.dumps(clf.source),
    }
    if clf.autoencoder is not None:
        metadata["autoencoder"] = json.dumps(clf.autoencoder.to_dict())
    path = Path(path)
    write_safetensors(path, tensors, metadata)
    return path


def load_classifier(path: Path) -> AttributeClassifier:
    """Read a classifier written by :func:`save_classifier`; CheckpointError if it is
    missing, corrupt or not a classifier file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no classifier file at {path} (make one with `dbae train-classifier`)")
    meta, tensors = read_tagged_safetensors(path, FORMAT, "dbae attribute classifier")
    try:
        names, kinds = tuple(json.loads(meta["names"])), tuple(json.loads(meta["kinds"]))
        clf = AttributeClassifier(
            names, kinds, tensors["weight"], tensors["bias"], tensors["z_mean"], tensors["z_std"],
            tensors["target_mean"], tensors["target_std"], json.loads(meta.get("metrics", "{}")),
            json.loads(meta.get("source", "{}")),
            AutoencoderRef.from_dict(json.loads(meta["autoencoder"]), path) if "autoencoder" in meta else None,
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} has unreadable contents ({exc})") from None
    k, d = clf.weight.shape
    if len(names) != k or len(kinds) != k or clf.bias.shape != (k,) or clf.z_mean.shape != (d,):
        raise CheckpointError(f"{path} has inconsistent tensor shapes")
    return clf
