"""Metrics of SPEC 10 against known answers and independent implementations, and
``dbae eval`` end to end on the tiny model."""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from dbae.cli.main import main
from dbae.errors import ConfigError, DataError
from dbae.metrics.disentangle import auroc_matrix, entropy_reduction, mutual_information_matrix, tad
from dbae.metrics.features import InceptionV3, extract, load_feature_extractor
from dbae.metrics.fid import feature_stats, fid, frechet_distance, inception_score, precision_recall
from dbae.metrics.lpips import CHANNELS, alexnet_features, load_lpips, packaged_lin_weights
from dbae.metrics.latent import posterior_snr
from dbae.metrics.probe import average_precision, classification_probe, fit_logistic, regression_probe

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----- FID / precision-recall / IS -----
def test_fid_of_a_set_with_itself_is_zero_and_gaussian_closed_form():
    g = _gen(0)
    x = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    # shifted and scaled Gaussians: FID = |m|^2 + sum (1 - s)^2 for N(0, I) vs N(m, s^2 I)
    y = torch.randn(4000, 8, generator=g, dtype=torch.float64) * 2.0 + 0.5
    exact = 8 * 0.5**2 + 8 * (1 - 2.0) ** 2
    a, b = feature_stats(x), feature_stats(y)
    from dbae.metrics.fid import GaussianStats

    ideal = frechet_distance(GaussianStats(torch.zeros(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64), 1),
                             GaussianStats(torch.full((8,), 0.5, dtype=torch.float64),
                                           4 * torch.eye(8, dtype=torch.float64), 1))
    assert ideal == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.05)
    assert fid(x, x + 0.1) > fid(x, x + 0.01) > 0


def test_fid_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = _gen(1)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    y = torch.randn(300, 16, generator=g, dtype=torch.float64) + 0.3
    m1, m2 = x.mean(0).numpy(), y.mean(0).numpy()
    s1, s2 = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real  # pytorch-fid's formula
    reference = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert fid(x, y) == pytest.approx(reference, rel=1e-6)


def test_precision_recall():
    g = _gen(2)
    x = torch.randn(200, 5, generator=g)
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    far = x + 100.0
    assert precision_recall(x, far) == {"precision": 0.0, "recall": 0.0}
    # generated set covering half of the real one: precision 1, recall about 1/2
    real = torch.randn(400, 2, generator=g)
    half = real[real[:, 0] > 0]
    pr = precision_recall(real, half)
    assert pr["precision"] == 1.0 and 0.3 < pr["recall"] < 0.7
    with pytest.raises(DataError, match="more than 3"):
        precision_recall(x[:3], x[:3])


def test_inception_score_known_values():
    assert inception_score(torch.zeros(50, 10))[0] == pytest.approx(1.0)
    confident = torch.full((40, 10), -1e4)
    confident[torch.arange(40), torch.arange(40) % 10] = 0.0
    mean, std = inception_score(confident, splits=2)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # hand-computed: two samples, p(y|x) = (0.5, 0.5) and (1, 0): p(y) = (0.75, 0.25)
    logits = torch.tensor([[0.0, 0.0], [0.0, -1e4]])
    kl = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25) + math.log(1 / 0.75)) / 2
    assert inception_score(logits)[0] == pytest.approx(math.exp(kl))


# ----- feature networks -----
class TinyScripted(nn.Module):
    """The NVIDIA/clean-fid calling convention: net(x in [0,255], return_features) ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = self.conv(x / 255.0).relu().mean(dim=(2, 3))
        return f if return_features else torch.softmax(self.fc(f), dim=1)


@pytest.fixture(scope="module")
def scripted_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("feat") / "tiny.pt"
    torch.jit.script(TinyScripted()).save(str(path))
    return path


def test_scripted_extractor(scripted_path):
    ext = load_feature_extractor(scripted_path)
    x = torch.rand(5, 3, 16, 16, generator=_gen(3))
    out = extract(ext, x, batch_size=2)
    assert out.features.shape == (5, 8) and out.logits.shape == (5, 4)
    ref = TinyScripted()
    ref.load_state_dict(torch.jit.load(str(scripted_path)).state_dict())
    assert torch.allclose(out.features, ref(x * 255, return_features=True), atol=1e-6)
    assert torch.allclose(torch.softmax(out.logits, 1), ref(x * 255), atol=1e-6)
    assert fid(out.features, out.features) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("classes", [1000, 1008])
def test_inception_state_dict_loads_strictly(tmp_path, classes):
    torch.manual_seed(0)
    net = InceptionV3(num_classes=classes, fid=classes == 1008)
    state = net.state_dict()
    if classes == 1000:  # torchvision's file also holds the auxiliary classifier
        state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(state, tmp_path / "inc.pth")
    ext = load_feature_extractor(tmp_path / "inc.pth")
    assert ("pytorch-fid" in ext.name) == (classes == 1008)
    out = ext(torch.rand(2, 3, 32, 32, generator=_gen(4)))
    assert out.features.shape == (2, 2048) and out.logits.shape == (2, classes)
    assert torch.isfinite(out.features).all()


def test_missing_or_wrong_inception_file(tmp_path):
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05"):
        load_feature_extractor(tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match="download"):
        load_feature_extractor(None)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="fc.weight"):
        load_feature_extractor(tmp_path / "bad.pth")


# ----- LPIPS -----
@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lpips")
    trunk = {f"features.{k}": v for k, v in alexnet_features().state_dict().items()}
    trunk["classifier.1.weight"] = torch.zeros(2, 2)  # the rest of torchvision's file is ignored
    torch.save(trunk, d / "alexnet.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}
    torch.save(lin, d / "alex.pth")
    return d / "alexnet.pth", d / "alex.pth"


def test_lpips_identical_zero_and_hand_formula(lpips_files):
    lp = load_lpips(*lpips_files)
    x = torch.rand(3, 3, 64, 64, generator=_gen(5))
    y = (x + 0.2 * torch.randn(x.shape, generator=_gen(6))).clamp(0, 1)
    assert torch.allclose(lp(x, x), torch.zeros(3))
    d = lp(x, y)
    assert (d > 0).all()
    # formula, written out independently layer by layer
    feats = alexnet_features()
    feats.load_state_dict({k[9:]: v for k, v in torch.load(lpips_files[0]).items() if k.startswith("features.")})
    lin = torch.load(lpips_files[1])
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    relus = [1, 4, 7, 9, 11]

    def layers(img):
        h, out = (img * 2 - 1 - shift) / scale, []
        for i, m in enumerate(feats):
            h = m(h)
            if i in relus:
                out.append(h.clone())
        return out

    total = torch.zeros(3)
    for i, (a, b) in enumerate(zip(layers(x), layers(y))):
        na = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        nb = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total += ((na - nb) ** 2 * lin[f"lin{i}.model.1.weight"]).sum(1).mean(dim=(1, 2))
    assert torch.allclose(d, total, rtol=1e-4, atol=1e-7)
    small = lp(x[:, :, :16, :16], y[:, :, :16, :16])  # upsampled to 64 first
    assert small.shape == (3,) and (small > 0).all()


def test_lpips_matches_the_lpips_package(lpips_files, monkeypatch):
    """Runs the lpips package's own forward pass (with a stand-in torchvision that
    returns our trunk, since the package would otherwise download AlexNet)."""
    if packaged_lin_weights() is None:
        pytest.skip("lpips package not installed (pip install --no-deps lpips)")
    trunk = alexnet_features()
    trunk.load_state_dict({k[9:]: v for k, v in torch.load(lpips_files[0]).items() if k.startswith("features.")})
    fake_tv = types.ModuleType("torchvision")
    fake_tv.models = types.SimpleNamespace(alexnet=lambda **kw: types.SimpleNamespace(features=trunk))
    monkeypatch.setitem(sys.modules, "torchvision", fake_tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake_tv.models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    import lpips  # noqa: PLC0415

    ref = lpips.LPIPS(net="alex", verbose=False, pnet_rand=True)
    ours = load_lpips(lpips_files[0], packaged_lin_weights())
    x = torch.rand(2, 3, 64, 64, generator=_gen(7))
    y = torch.rand(2, 3, 64, 64, generator=_gen(8))
    with torch.no_grad():
        expected = ref(x, y, normalize=True).flatten()
    assert torch.allclose(ours(x, y), expected, rtol=1e-4)


def test_lpips_missing_files(tmp_path, lpips_files):
    with pytest.raises(ConfigError, match="alexnet-owt-7be5be79.pth"):
        load_lpips(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="alex.pth"):
        load_lpips(lpips_files[0], tmp_path / "missing_lin.pth")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="lin1"):
        load_lpips(lpips_files[0], tmp_path / "partial.pth")


# ----- probe -----
def test_average_precision_hand_computed_and_sklearn():
    # ranking 1 0 1 0: AP = 1/2 * 1/1 + 1/2 * 2/3
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # all positives first: AP = 1
    assert average_precision(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 1, 0])) == 1.0
    assert math.isnan(average_precision(torch.tensor([1.0, 2.0]), torch.tensor([0, 0])))
    g = _gen(9)
    for trial in range(5):
        scores = torch.randint(0, 6, (200,), generator=g).double() if trial % 2 else torch.randn(200, generator=g)
        labels = (torch.rand(200, generator=g) < 0.3).long()
        expected = sklearn_metrics.average_precision_score(labels.numpy(), scores.numpy())
        assert average_precision(scores, labels) == pytest.approx(expected, rel=1e-12)


def test_logistic_probe_matches_sklearn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    g = _gen(10)
    z = torch.randn(300, 6, generator=g, dtype=torch.float64)
    y = torch.stack([(z[:, 0] + 0.5 * torch.randn(300, generator=g, dtype=torch.float64) > 0),
                     (z[:, 1] - z[:, 2] > 0.5)], 1).double()
    w, b = fit_logistic(z, y, C=0.5)
    for a in range(2):
        ref = linear_model.LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(z.numpy(), y[:, a].numpy())
        assert np.allclose(w[a].numpy(), ref.coef_[0], atol=1e-4)
        assert b[a].item() == pytest.approx(ref.intercept_[0], abs=1e-4)
    zt = torch.randn(200, 6, generator=g, dtype=torch.float64)
    yt = torch.stack([zt[:, 0] > 0, zt[:, 1] - zt[:, 2] > 0.5], 1).double()
    res = classification_probe(z, y, zt, yt)
    assert res["map"] > 0.9
    with pytest.raises(DataError, match="'always' takes one value"):
        classification_probe(z, torch.ones(300, 1), zt, yt[:, :1], names=["always"])


def test_regression_probe_exact_and_sklearn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    g = _gen(11)
    z = torch.randn(100, 4, generator=g, dtype=torch.float64)
    target = torch.stack([2 * z[:, 0] - z[:, 3] + 1, z[:, 1] + torch.randn(100, generator=g, dtype=torch.float64)], 1)
    zt = torch.randn(80, 4, generator=g, dtype=torch.float64)
    tt = torch.stack([2 * zt[:, 0] - zt[:, 3] + 1, zt[:, 1] + torch.randn(80, generator=g, dtype=torch.float64)], 1)
    res = regression_probe(z, target, zt, tt)
    assert res["pearson_r"][0] == pytest.approx(1.0, abs=1e-9) and res["mse"][0] == pytest.approx(0.0, abs=1e-9)
    pred = linear_model.LinearRegression().fit(z.numpy(), target.numpy()).predict(zt.numpy())
    r = np.corrcoef(pred[:, 1], tt[:, 1].numpy())[0, 1]
    assert res["pearson_r"][1] == pytest.approx(r, rel=1e-8)
    sd, mu = target[:, 1].std(unbiased=False).item(), target[:, 1].mean().item()
    assert res["mse"][1] == pytest.approx(np.mean(((pred[:, 1] - tt[:, 1].numpy())) ** 2) / sd**2, rel=1e-8)
    assert mu == pytest.approx(target[:, 1].numpy().mean())


def test_posterior_snr_known_values():
    """var over images of mu (unbiased) over the mean of sig^2, per dimension."""
    mu = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    sig = torch.tensor([[1.0, 0.5], [1.0, 0.5], [3.0, 0.5]])
    snr = posterior_snr(mu, sig)
    assert torch.allclose(snr, torch.tensor([4.0 / (11.0 / 3.0), 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="n >= 2"):
        posterior_snr(mu[:1], sig[:1])


# ----- TAD -----
def test_auroc_matches_sklearn_and_mutual_information():
    g = _gen(12)
    z = torch.randint(0, 5, (300, 3), generator=g).double()  # many ties
    y = (torch.rand(300, 2, generator=g) < 0.4).double()
    aur = auroc_matrix(z, y)
    for a in range(2):
        for j in range(3):
            s = sklearn_metrics.roc_auc_score(y[:, a].numpy(), z[:, j].numpy())
            assert aur[a, j].item() == pytest.approx(max(s, 1 - s), rel=1e-12)
    mi = mutual_information_matrix(y)
    for a in range(2):
        for b in range(2):
            assert mi[a, b].item() == pytest.approx(sklearn_metrics.mutual_info_score(y[:, a], y[:, b]), abs=1e-12)
    # a copy of an attribute reduces its entropy fully
    assert entropy_reduction(torch.stack([y[:, 0], y[:, 0], y[:, 1]], 1))[0].item() == pytest.approx(1.0)


def test_tad_one_dimension_per_attribute_and_random_codes():
    g = _gen(13)
    y = (torch.rand(1000, 3, generator=g) < 0.5).double()
    z = torch.randn(1000, 6, generator=g)
    z[:, 0], z[:, 2], z[:, 4] = y[:, 0], -y[:, 1], y[:, 2] + 0.01 * torch.randn(1000, generator=g)
    res = tad(z, y, ["a", "b", "c"])
    assert res["attrs"] == 3
    per = res["per_attribute"]
    assert [per[n]["best_dim"] for n in "abc"] == [0, 2, 4]
    # each best AUROC is 1; the second best is a random dimension, about 0.5
    assert res["tad"] == pytest.approx(sum(1 - per[n]["second_auroc"] for n in "abc"))
    assert 1.3 < res["tad"] < 1.5
    random = tad(torch.randn(1000, 6, generator=g), y)
    assert random["attrs"] == 0 and random["tad"] == 0.0
    # an entangled pair (b = a) is dropped even though a dimension captures it
    dup = tad(z, torch.stack([y[:, 0], y[:, 0], y[:, 2]], 1))
    assert dup["attrs"] == 1 and not dup["per_attribute"]["attr0"]["kept"]


# ----- the CLI -----
@pytest.mark.slow
def test_eval_cli_end_to_end(trained_tiny, tmp_path, scripted_path, lpips_files, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "recon", "--ckpt", str(trained_tiny), "--dataset", "shapes", "--n", "4", "--nfe", "2",
                 "--out", str(out), "--lpips-weights", str(lpips_files[0]), "--lpips-lin", str(lpips_files[1])]) == 0
    rec = json.loads((out / "recon.json").read_text())
    assert {"mse", "psnr", "ssim", "lpips"} <= rec.keys() and 0 < rec["ssim"] <= 1
    assert "| ssim |" in (out / "recon.md").read_text()

    assert main(["eval", "probe", "--ckpt", str(trained_tiny), "--n-train", "64", "--n-test", "32",
                 "--out", str(out)]) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe["classification"]["ap"]) >= {"shape=circle", "colour=red"}
    assert set(probe["regression"]["pearson_r"]) == {"size", "x", "y", "rotation", "background"}
    assert "| mAP |" in (out / "probe.md").read_text()

    assert main(["eval", "tad", "--ckpt", str(trained_tiny), "--n-test", "64", "--out", str(out)]) == 0
    t = json.loads((out / "tad.json").read_text())
    assert t["n"] == 64 and "size>0.35" in t["per_attribute"] and t["attrs"] >= 0
    assert "| TAD |" in (out / "tad.md").read_text()

    assert main(["eval", "fid", "--ckpt", str(trained_tiny), "--inception", str(scripted_path), "--n", "8",
                 "--nfe", "2", "--out", str(out)]) == 0
    f = json.loads((out / "fid.json").read_text())
    assert f["fid"] >= 0 and 0 <= f["precision"] <= 1 and f["inception_score"] >= 1
    assert "| fid |" in (out / "fid.md").read_text()

    # errors: missing weights (message says how to get them), unknown attribute
    capsys.readouterr()
    assert main(["eval", "fid", "--ckpt", str(trained_tiny), "--inception", str(tmp_path / "x.pth"),
                 "--out", str(out)]) == 2
    assert "pt_inception-2015-12-05" in capsys.readouterr().err
    assert main(["eval", "probe", "--ckpt", str(trained_tiny), "--n-train", "8", "--n-test", "4",
                 "--attrs", "hat", "--out", str(out)]) == 2
    assert "unknown attribute 'hat'" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_attribute_file_and_folders(trained_tiny, tmp_path, scripted_path):
    from dbae.data.shapes import ShapesDataset
    from dbae.imageio import save_image

    folder = tmp_path / "img"
    data = ShapesDataset(image_size=16, seed=3, split="test")
    rows = []
    for i in range(24):
        image, factors = data[i]
        save_image(folder / f"{i:06d}.png", image)
        rows.append(f"{i:06d}.png {'1' if factors[0] == 0 else '-1'} {'1' if factors[2] > 0.35 else '-1'}")
    attr = tmp_path / "list_attr_celeba.txt"
    attr.write_text(f"{len(rows)}\nCircle Big\n" + "\n".join(rows) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "probe", "--ckpt", str(trained_tiny), "--attributes", str(attr), "--images", str(folder),
                 "--n-train", "16", "--n-test", "8", "--out", str(out)]) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe["classification"]["ap"]) == {"Circle", "Big"} and "regression" not in probe
    assert main(["eval", "fid", "--real", str(folder), "--fake", str(folder), "--inception", str(scripted_path),
                 "--n", "24", "--out", str(out)]) == 0
    f = json.loads((out / "fid.json").read_text())
    assert f["fid"] == pytest.approx(0.0, abs=1e-6) and f["precision"] == 1.0 and f["recall"] == 1.0
