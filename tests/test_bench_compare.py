"""``dbae bench compare`` (the paper's Tables 5 and 2 measured here): NFE per method and
setting, timings, outputs, the CLI end to end, PDAE's optional registration and clear errors."""

from __future__ import annotations

import json
import types

import pytest
import torch

from dbae.baselines import compare
from dbae.baselines.config import DiffAEConfig, diffae_preset
from dbae.baselines.diffae import DiffAE
from dbae.cli.main import main
from dbae.errors import ConfigError

CPU = torch.device("cpu")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def adapters() -> dict[str, compare.Adapter]:
    return {name: compare.METHODS[name].build("tiny16", CPU) for name in ("dbae", "diffae")}


def test_default_plan_uses_the_authors_step_counts(adapters):
    plan = compare.plan_settings(adapters, settings=["authors", "equal-nfe"], dbae_nfe=10)
    assert plan.equal_nfe == 10
    assert plan.rows["dbae"] == [("authors", 0, 10), ("equal-nfe", 0, 10)]
    assert plan.rows["diffae"] == [("authors", 250, 20), ("authors", 250, 100), ("equal-nfe", 5, 5)]


def test_rows_have_each_methods_exact_nfe_and_sane_times(adapters):
    plan = compare.plan_settings(adapters, settings=["authors", "equal-nfe"], dbae_nfe=4,
                                 inversion_steps=[6], decode_steps=[2, 3])  # fmt: skip
    rows = compare.bench_compare(adapters, plan, batch=2, device=CPU, warmup=1, runs=3)
    got = {(r.method, r.setting, r.inversion_steps, r.decode_steps): (r.infer_nfe, r.decode_nfe, r.total_nfe)
           for r in rows}  # fmt: skip
    assert got == {
        ("dbae", "authors", 0, 4): (0, 4, 4),
        ("dbae", "equal-nfe", 0, 4): (0, 4, 4),
        ("diffae", "authors", 6, 2): (6, 2, 8),
        ("diffae", "authors", 6, 3): (6, 3, 9),
        ("diffae", "equal-nfe", 2, 2): (2, 2, 4),
    }
    assert {r.total_nfe for r in rows if r.setting == "equal-nfe"} == {4}
    for r in rows:
        assert r.encoder_passes == 1 and r.dec_psi_passes == (1 if r.method == "dbae" else 0)
        assert r.network_evals == r.total_nfe
        for op in compare.OPS:
            med, p95 = getattr(r, f"{op}_median_ms"), getattr(r, f"{op}_p95_ms")
            assert 0 < med <= p95
    text = compare.format_table(rows)
    assert text.count("\n") == len(rows)


def test_equal_nfe_is_split_between_inversion_and_decoding(adapters):
    plan = compare.plan_settings(adapters, settings=["equal-nfe"], dbae_nfe=10, equal_nfe=7)
    assert plan.rows == {"dbae": [("equal-nfe", 0, 7)], "diffae": [("equal-nfe", 3, 4)]}
    with pytest.raises(ConfigError, match="equal NFE >= 2"):
        compare.plan_settings(adapters, settings=["equal-nfe"], dbae_nfe=10, equal_nfe=1)


def test_steps_beyond_the_schedule_are_refused_before_timing(adapters):
    with pytest.raises(ConfigError, match=r"diffae inversion steps .* at most 1000"):
        compare.plan_settings(adapters, settings=["authors"], dbae_nfe=10, inversion_steps=[1001], decode_steps=[2])
    with pytest.raises(ConfigError, match=r"diffae decode steps"):
        compare.plan_settings(adapters, settings=["authors"], dbae_nfe=10, inversion_steps=[2], decode_steps=[0])
    with pytest.raises(ConfigError, match="dbae decode NFE"):
        compare.plan_settings(adapters, settings=["authors"], dbae_nfe=0)


def test_quality_reports_tractable_reconstruction(adapters):
    q = compare.quality(adapters, images=3, nfe=2, batch=2, device=CPU)
    assert [(r["method"], r["x_T"], r["nfe"], r["images"]) for r in q] == [
        ("dbae", "Dec(z)", 2, 3), ("diffae", "random N(0, I)", 2, 3)]  # fmt: skip
    for r in q:
        assert r["mse"] > 0 and -1 <= r["ssim"] <= 1 and r["psnr"] > 0


class _FakePDAE(DiffAE):
    """Stands in for dbae.baselines.pdae.PDAE (same API as DiffAE)."""


def _fake_pdae_module() -> types.SimpleNamespace:
    cfg = types.SimpleNamespace(from_model_config=DiffAEConfig.from_model_config)
    return types.SimpleNamespace(PDAE=_FakePDAE, PDAEConfig=cfg, pdae_preset=diffae_preset)


def test_a_pdae_with_the_expected_api_is_pluggable(adapters):
    spec = compare._pdae_spec(_fake_pdae_module())
    assert spec.authors == ((1000, 100), (500, 100), (100, 100))
    ads = {**adapters, "pdae": spec.build("tiny16", CPU)}
    old = compare.METHODS.get("pdae")
    compare.METHODS["pdae"] = spec
    try:
        plan = compare.plan_settings(ads, settings=["authors", "equal-nfe"], dbae_nfe=4)
        assert plan.rows["pdae"] == [("authors", 1000, 100), ("authors", 500, 100), ("authors", 100, 100),
                                     ("equal-nfe", 2, 2)]  # fmt: skip
        plan = compare.plan_settings({"pdae": ads["pdae"]}, settings=["authors"], dbae_nfe=4,
                                     inversion_steps=[3], decode_steps=[2])  # fmt: skip
        (row,) = compare.bench_compare({"pdae": ads["pdae"]}, plan, batch=1, device=CPU, warmup=0, runs=2)
        assert (row.infer_nfe, row.decode_nfe, row.total_nfe) == (3, 2, 5)
        assert (row.dec_psi_passes, row.network_evals) == (3, 10)  # PDAE: eps_theta + G_psi per step
    finally:
        if old is None:
            compare.METHODS.pop("pdae", None)
        else:
            compare.METHODS["pdae"] = old
    with pytest.raises(ValueError, match="infer_x_T"):
        compare._pdae_spec(types.SimpleNamespace(PDAE=type("P", (), {"encode": lambda s: 0})))


def test_the_real_pdae_when_it_is_there():
    names, notes = compare.resolve_methods(None)
    if "pdae" not in names:
        pytest.skip(notes[0] if notes else "no PDAE")
    pdae = {"pdae": compare.METHODS["pdae"].build("tiny16", CPU)}
    plan = compare.plan_settings(pdae, settings=["authors"], dbae_nfe=4)
    assert plan.rows["pdae"] == [("authors", 1000, 100), ("authors", 500, 100), ("authors", 100, 100)]
    plan = compare.plan_settings(pdae, settings=["authors", "equal-nfe"], dbae_nfe=3,
                                 inversion_steps=[2], decode_steps=[2])  # fmt: skip
    rows = compare.bench_compare(pdae, plan, batch=1, device=CPU, warmup=0, runs=2)
    assert [(r.infer_nfe, r.decode_nfe, r.total_nfe, r.network_evals) for r in rows] == [(2, 2, 4, 8), (1, 2, 3, 6)]
    with pytest.raises(ConfigError, match="pdae inversion steps"):
        compare.plan_settings(pdae, settings=["authors"], dbae_nfe=4, inversion_steps=[5000], decode_steps=[2])


def test_a_missing_pdae_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(compare, "METHODS", {k: v for k, v in compare.METHODS.items() if k != "pdae"})
    monkeypatch.setattr(compare, "_UNAVAILABLE", {"pdae": "dbae.baselines.pdae is not there yet"})
    monkeypatch.setattr(compare, "_DISCOVERED", True)
    names, notes = compare.resolve_methods(None)
    assert names == ["dbae", "diffae"]
    assert notes == ["skipping pdae: dbae.baselines.pdae is not there yet"]
    with pytest.raises(ConfigError, match="unknown method.*'vae'"):
        compare.resolve_methods(["dbae", "vae"])


def test_cli_end_to_end_writes_table_json_markdown(capsys, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run(capsys, "bench", "compare", "--preset", "tiny16", "--methods", "dbae", "diffae",
                            "--batch", "2", "--nfe", "4", "--inversion-steps", "4", "--decode-steps", "2",
                            "--runs", "2", "--warmup", "0", "--quality", "2", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert "x_T ms" in stdout and "random weights: a smoke check" in stdout
    data = json.loads((out / "compare.json").read_text())
    rows = {(r["method"], r["setting"]): r for r in data["rows"]}
    assert rows["dbae", "authors"]["total_nfe"] == 4 and rows["dbae", "authors"]["infer_nfe"] == 0
    assert (rows["diffae", "authors"]["infer_nfe"], rows["diffae", "authors"]["decode_nfe"]) == (4, 2)
    assert rows["diffae", "equal-nfe"]["total_nfe"] == rows["dbae", "equal-nfe"]["total_nfe"] == 4
    assert data["meta"]["random_weights"] is True and data["meta"]["equal_nfe"] == 4
    assert [q["method"] for q in data["quality"]] == ["dbae", "diffae"]
    md = (out / "compare.md").read_text()
    assert "| DiffAE | authors | 4 | 2 |" in md and "smoke check" in md


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "dbae", "vae"], "unknown method"),
        (["--inversion-steps", "1001", "--decode-steps", "2"], "at most 1000"),
        (["--settings", "equal-nfe", "--equal-nfe", "1"], "equal NFE >= 2"),
        (["--nfe", "0"], "dbae decode NFE"),
        (["--runs", "0"], "--runs must be >= 1"),
    ],
)
def test_cli_bad_arguments_give_clear_errors(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "bench", "compare", "--preset", "tiny16", "--out", str(tmp_path), *argv)
    assert code == 2
    assert message in err


def test_cli_needs_a_preset_without_checkpoints(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "compare", "--methods", "dbae", "--out", str(tmp_path))
    assert code == 2 and "--preset is needed" in err
