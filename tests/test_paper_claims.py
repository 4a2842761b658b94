"""``benchmarks/paper_claims.py --smoke`` end to end (the whole study on tiny16 in seconds),
reuse of its trained runs, and the claims' verdicts against hand-made numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dbae.baselines.checkpoints import LoadedBaseline, load_any
from dbae.errors import ConfigError
from dbae.study import StudyConfig, claims, smoke_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_claims.py"


def _script():
    spec = importlib.util.spec_from_file_location("paper_claims", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    assert _script().main(["--smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def test_smoke_run_writes_every_row_and_file(smoke, capsys):
    data = json.loads((smoke / "paper_claims.json").read_text())
    cfg = smoke_config()
    rows = {(r["method"], r["setting"]): r for r in data["reconstruction"]}
    assert set(rows) == {("dbae", "tractable"), ("dbae-d", "tractable"), ("diffae", "tractable"),
                         ("diffae", "inverted"), ("pdae", "tractable"), ("pdae", "inverted")}  # fmt: skip
    for (method, setting), r in rows.items():
        assert r["images"] == cfg.recon_images and 0 <= r["mse"] and 0 <= r["ssim"] <= 1, r
        if method.startswith("dbae"):
            assert r["x_T"] == "Dec(z)" and r["nfe"] == cfg.dbae_nfe
        elif setting == "tractable":
            assert r["x_T"] == "random N(0, I)" and r["nfe"] == cfg.decode_steps and r["inversion_steps"] == 0
        else:
            assert r["nfe"] == cfg.decode_steps + r["inversion_steps"] and r["inversion_steps"] == 3
    # the inverted x_T carries what z misses: far better than a random one, even barely trained
    for method in ("diffae", "pdae"):
        assert rows[(method, "inverted")]["mse"] < 0.5 * rows[(method, "tractable")]["mse"]
    assert set(data["representation"]) == {"dbae", "dbae-d", "diffae", "pdae"}
    for rep in data["representation"].values():
        assert 0 < rep["map"] <= 1 and rep["n_train"] == cfg.probe_train and rep["n_test"] == cfg.probe_test
        assert rep["z_dim"] == 16 and 0 <= rep["attrs"] <= rep["tad_attributes"]
    lat = {r["method"]: r for r in data["latency"]}
    assert set(lat) == set(data["representation"])
    assert all(r["encode_ms"] > 0 and r["infer_ms"] > 0 and r["decode_ms"] > 0 for r in lat.values())
    assert lat["diffae"]["inversion_steps"] == 3 and lat["dbae"]["inversion_steps"] == 0
    # every method trained with the same budget, to a checkpoint of its own kind
    assert [t["name"] for t in data["training"]] == ["dbae", "dbae-d", "diffae", "pdae"]
    for t in data["training"]:
        assert t["steps"] == cfg.steps and t["batch_size"] == cfg.batch_size and t["resumed_from"] == 0
        loaded = load_any(t["checkpoint"])
        if t["name"] in ("diffae", "pdae"):
            assert isinstance(loaded, LoadedBaseline) and loaded.method == t["name"]
        else:
            assert loaded.preset.model.encoder.stochastic == (t["name"] == "dbae")
    # the claims' verdicts follow the numbers in the rows
    recon_claims = {tuple(c["methods"]): c for c in data["claims"] if c["kind"] == "reconstruction"}
    assert set(recon_claims) == {("dbae", "diffae"), ("dbae", "pdae"), ("dbae-d", "diffae"), ("dbae-d", "pdae"),
                                 ("dbae-d", "dbae")}  # fmt: skip
    for (ours, base), c in recon_claims.items():
        a, b = rows[(ours, "tractable")], rows[(base, "tractable")]
        wins = [a["mse"] < b["mse"], a["psnr"] > b["psnr"], a["ssim"] > b["ssim"]]
        assert c["verdict"] == ("holds" if all(wins) else "fails" if not any(wins) else "mixed"), c
    others = {(c["kind"], *c["methods"]) for c in data["claims"] if c["kind"] != "reconstruction"}
    assert others == {("latency", "dbae", "diffae"), ("latency", "dbae", "pdae"), ("probe", "dbae", "dbae-d"),
                      ("probe", "dbae", "diffae"), ("probe", "dbae", "pdae")}  # fmt: skip
    md = (smoke / "paper_claims.md").read_text()
    for line in ("| DBAE | tractable | Dec(z) |", "| DBAE-d | tractable | Dec(z) |", "| DiffAE | tractable | random",
                 "| DiffAE | inverted | DDIM inversion (3 steps) |", "| PDAE | inverted |", "## Claims",
                 "![latency](paper_claims_latency.png)"):  # fmt: skip
        assert line in md, line
    for png in ("paper_claims_recon.png", "paper_claims_grid.png", "paper_claims_latency.png"):
        assert (smoke / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_reuses_the_trained_runs(smoke, capsys):
    before = json.loads((smoke / "paper_claims.json").read_text())
    assert _script().main(["--smoke", "--out", str(smoke), "--no-progress"]) == 0
    after = json.loads((smoke / "paper_claims.json").read_text())
    assert [t["resumed_from"] for t in after["training"]] == [3, 3, 3, 3]
    # a reused run reports the training time recorded when it was trained
    assert [t["seconds"] for t in after["training"]] == [t["seconds"] for t in before["training"]]
    assert all(t["seconds"] > 0 for t in after["training"])
    assert after["reconstruction"] == before["reconstruction"]  # the same checkpoints, seeded measurements
    assert after["representation"] == before["representation"]
    capsys.readouterr()
    assert _script().main(["--smoke", "--steps", "2", "--out", str(smoke), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained to step 3, not 2" in err and len(err.strip().splitlines()) == 1


def _rows(dbae: tuple[float, float, float], diffae: tuple[float, float, float]) -> dict:
    def row(method: str, v: tuple[float, float, float]) -> dict:
        return {"method": method, "setting": "tractable", "mse": v[0], "psnr": v[1], "ssim": v[2]}

    return {"reconstruction": [row("dbae", dbae), row("diffae", diffae)], "latency": [], "representation": None}


def test_claim_verdicts():
    (c,) = claims(_rows((0.01, 20.0, 0.9), (0.02, 17.0, 0.7)))
    assert c["verdict"] == "holds" and c["better_on"] == ["MSE", "PSNR", "SSIM"] and c["paper"] == "Table 2"
    assert "MSE 0.01000 vs 0.02000" in c["numbers"]
    assert claims(_rows((0.03, 15.0, 0.5), (0.02, 17.0, 0.7)))[0]["verdict"] == "fails"
    (c,) = claims(_rows((0.01, 20.0, 0.5), (0.02, 17.0, 0.7)))
    assert c["verdict"] == "mixed" and c["better_on"] == ["MSE", "PSNR"]
    lat = {"reconstruction": [], "representation": None, "latency": [
        {"method": "dbae", "infer_ms": 0.5, "inversion_steps": 0},
        {"method": "pdae", "infer_ms": 50.0, "inversion_steps": 100}]}  # fmt: skip
    (c,) = claims(lat)
    assert c["paper"] == "Table 5" and c["verdict"] == "holds" and "(100x)" in c["numbers"]


def test_study_config_checks():
    with pytest.raises(ConfigError, match="methods must be"):
        StudyConfig(methods=("dbae", "vae"))
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        StudyConfig(steps=0)
    with pytest.raises(ConfigError, match="unknown preset"):
        StudyConfig(preset="nope")
    assert StudyConfig().replace(steps=None, seed=3).seed == 3
