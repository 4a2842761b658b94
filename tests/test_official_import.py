"""`dbae import` and `--ckpt FILE.pt`: the authors' files as runs, their classifier, the
sampling options that reproduce their released inference, and every runtime on the result.
(Numerical parity of the conversion itself: tests/test_official_dbae.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import OFFICIAL_DBAE, OFFICIAL_TINY_HEAD_CHANNELS

from dbae.apps.attributes import load_classifier
from dbae.apps.manipulate import shift_latents
from dbae.checkpoints import official_dbae, read_header, resolve_checkpoint
from dbae.checkpoints.foreign import load_weights_only
from dbae.checkpoints.imports import IMPORT_RECORD, imported_record, read_foreign
from dbae.checkpoints.manifest import read_manifest, sha256_file
from dbae.cli.main import main
from dbae.data.attributes import CELEBA_ATTRIBUTES
from dbae.inference import load_model
from dbae.prior.identity import AutoencoderRef

TINY128 = OFFICIAL_DBAE / "tiny128_det" / "ema_0.9999_000000.pt"
TINY64 = OFFICIAL_DBAE / "tiny64_sto" / "ema_0.9999_000000.pt"


def _error(capsys, argv: list[str]) -> str:
    """The one error line of a command that must fail with exit code 2 (after any notes)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(errors) == 1 and errors[0].startswith("dbae ") and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def authors_head_width(monkeypatch):
    """Files read straight from --ckpt take the authors' head width (64, which shapes cannot
    tell); the tiny fixtures were made with 16."""
    monkeypatch.setattr(official_dbae, "HEAD_CHANNELS", OFFICIAL_TINY_HEAD_CHANNELS)


def test_import_writes_a_run_that_loads_without_conversion(imported_tiny128, capsys):
    run, _ = imported_tiny128
    loaded = load_model(run)
    direct = read_foreign(TINY128, num_head_channels=OFFICIAL_TINY_HEAD_CHANNELS)
    assert loaded.preset == direct.preset and loaded.preset.name == "official-custom"
    state = loaded.model.state_dict()
    assert set(state) == set(direct.state)
    assert all(torch.equal(state[k], direct.state[k].float()) for k in state)
    record = json.loads((run / IMPORT_RECORD).read_text())
    assert record["source_sha256"] == sha256_file(TINY128) and record["kind"] == "official-dbae"
    assert record["num_head_channels"] == OFFICIAL_TINY_HEAD_CHANNELS and len(record["converted"]) >= 5
    path = resolve_checkpoint(run)
    assert imported_record(read_header(path))["source_sha256"] == record["source_sha256"]
    assert read_manifest(path.parent)[path.name]["sha256"] == sha256_file(path)  # a normal run: checked on load
    assert json.loads((run / "config.json").read_text())["name"] == "official-custom"
    assert main(["info", "--ckpt", str(run), "--no-config"]) == 0
    assert "imported from ema_0.9999_000000.pt" in capsys.readouterr().out


def test_import_never_replaces_a_run(imported_tiny128, capsys):
    run, _ = imported_tiny128
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    err = _error(capsys, ["import", str(TINY128), "--out", str(run), "--num-head-channels", "16"])
    assert "already holds checkpoints" in err
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*")}


class Plain:
    """Any class: a pickle holding one can run code when unpickled."""


def test_import_refuses_what_it_cannot_read_safely_or_map(tmp_path, capsys):
    out = str(tmp_path / "run")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"weight": torch.ones(2), "extra": Plain()}, unsafe)
    err = _error(capsys, ["import", str(unsafe), "--out", out])
    assert "arbitrary unpickling" in err and "Plain" in err
    other = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.ones(2), "bar.bias": torch.ones(1)}, other)
    assert "no known checkpoint layout (its first keys: foo.weight, bar.bias)" in _error(
        capsys, ["import", str(other), "--out", out])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert "neither a dbae safetensors file nor a PyTorch checkpoint" in _error(
        capsys, ["import", str(garbage), "--out", out])
    # the authors' layout with one tensor missing, or one too many: named
    state = load_weights_only(TINY128)
    missing = dict(state)
    del missing["input_blocks.1.0.emb_layers.1.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    err = _error(capsys, ["import", str(tmp_path / "missing.pt"), "--out", out, "--num-head-channels", "16"])
    assert "found no key (first: unet.input_blocks.1.0.emb_proj.1.weight)" in err
    extra = {**state, "decoder.feat_8.3.weight": torch.ones(3)}
    torch.save(extra, tmp_path / "extra.pt")
    err = _error(capsys, ["import", str(tmp_path / "extra.pt"), "--out", out, "--num-head-channels", "16"])
    assert "fit nowhere (first: decoder.feat_8.3.weight)" in err
    # shapes cannot tell the heads: the authors' 64 does not divide this width, so say what to do
    assert "--num-head-channels" in _error(capsys, ["import", str(TINY128), "--out", out])
    assert not (tmp_path / "run").exists()


def test_ckpt_takes_the_authors_file_directly(imported_tiny128, authors_head_width, tmp_path, capsys):
    """--ckpt FILE.pt converts in memory (with one line pointing to dbae import) into
    exactly the model that the imported run holds."""
    run, _ = imported_tiny128
    direct, imported = load_model(TINY128), load_model(run)
    assert direct.preset == imported.preset and direct.step == imported.step
    a, b = direct.model.state_dict(), imported.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["reconstruct", "--ckpt", str(TINY64), "--dataset", "shapes", "--n", "1", "--nfe", "1",
                 "--zoom", "1", "--out", str(tmp_path / "direct.png")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "converted ema_0.9999_000000.pt in memory" in err and "dbae import" in err
    assert "EMA weights only" in _error(capsys, ["reconstruct", "--ckpt", str(run), "--raw-weights", "--dataset",
                                                 "shapes", "--n", "1", "--out", str(tmp_path / "raw.png")])


def test_sampling_options_reproduce_the_released_inference(tmp_path, authors_head_width, capsys):
    """--sampling-sigma-T 0 and --sample-z (the authors' released settings) change the result,
    are recorded, and are reproducible with a seed."""
    common = ["reconstruct", "--ckpt", str(TINY64), "--dataset", "shapes", "--n", "1", "--nfe", "1", "--zoom", "1"]
    runs = {"default": [], "authors": ["--sampling-sigma-T", "0", "--sample-z", "--seed", "3"],
            "again": ["--sampling-sigma-T", "0", "--sample-z", "--seed", "3"]}
    reports = {}
    for name, extra in runs.items():
        assert main([*common, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["default"]["sampling_sigma_T"] == 0.5 and reports["default"]["sample_z"] is False
    assert reports["authors"]["sampling_sigma_T"] == 0.0 and reports["authors"]["sample_z"] is True
    assert reports["authors"]["mse"] == reports["again"]["mse"] != reports["default"]["mse"]
    assert "--sampling-sigma-T must be a finite number >= 0" in _error(capsys, [*common, "--sampling-sigma-T", "-1",
                                                                     "--out", str(tmp_path / "bad.png")])


def test_the_authors_classifier_acts_on_raw_z(imported_tiny128, authors_head_width, tmp_path, capsys):
    run, classifier = imported_tiny128
    clf = load_classifier(classifier)
    assert clf.names == CELEBA_ATTRIBUTES and clf.names[20] == "Male" and clf.names[39] == "Young"
    assert set(clf.kinds) == {"binary"}
    torch.manual_seed(40)
    linear = torch.nn.Linear(16, 40)  # what the fixture saved
    assert torch.equal(clf.weight, linear.weight.detach()) and torch.equal(clf.bias, linear.bias.detach())
    # their rule: z' = z + s sqrt(d) w / |w|, z not normalised
    z = torch.randn(3, 16)
    w = linear.weight[31].detach()
    expected = z + 0.7 * math.sqrt(16) * w / w.norm()
    assert torch.allclose(shift_latents(z, clf, "Smiling", [0.7])[0], expected, atol=1e-6)
    assert clf.autoencoder.sha256 == sha256_file(TINY128)  # the weights' identity: the authors' file
    # so it fits the imported run and the authors' file itself, and nothing else
    clf.check_model(load_model(run).model, AutoencoderRef.of(resolve_checkpoint(run), ema=True, step=0,
                                                             preset="official-custom", z_dim=16))  # fmt: skip
    out = tmp_path / "edit.png"
    assert main(["manipulate", "--ckpt", str(TINY128), "--classifier", str(classifier), "--attr", "Smiling",
                 "--scale", "1", "--mode", "both", "--dataset", "shapes", "--n", "1", "--nfe", "1",
                 "--zoom", "1", "--out", str(out)]) == 0  # fmt: skip
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["attribute"] == "Smiling"
    err = _error(capsys, ["manipulate", "--ckpt", str(TINY64), "--classifier", str(classifier), "--attr", "Smiling",
                          "--dataset", "shapes", "--n", "1", "--out", str(tmp_path / "other.png")])
    assert "another autoencoder" in err or "16-dimensional" in err


def test_classifier_import_errors(imported_tiny128, tmp_path, capsys):
    run, _ = imported_tiny128
    out = str(tmp_path / "clf.safetensors")
    for name, state in {"narrow": torch.nn.Linear(8, 40).state_dict(), "ten": torch.nn.Linear(16, 10).state_dict(),
                        "two": {**torch.nn.Linear(16, 40).state_dict(), "extra": torch.ones(1)}}.items():
        torch.save(state, tmp_path / f"{name}.pt")
    assert "8-dimensional latents" in _error(capsys, ["import", str(tmp_path / "narrow.pt"), "--classifier",
                                                      "--for", str(run), "--out", out])  # fmt: skip
    assert "has 10 outputs" in _error(capsys, ["import", str(tmp_path / "ten.pt"), "--classifier", "--for",
                                               str(run), "--out", out])  # fmt: skip
    assert "not the state dict of one nn.Linear" in _error(capsys, ["import", str(tmp_path / "two.pt"),
                                                                    "--classifier", "--for", str(run), "--out", out])
    assert "--classifier needs --for" in _error(capsys, ["import", str(tmp_path / "ten.pt"), "--classifier",
                                                         "--out", out])  # fmt: skip


def test_the_official_networks_run_in_every_cpu_runtime(tmp_path):
    """The authors' networks as converted (affine-norm decoder, bias-free 1x1 output conv,
    reordered multi-head attention, one-head encoder attention) through torch.compile (the
    decoder, whose structure is new; on the CPU) and through the ONNX export and ONNX
    Runtime, with the authors' sampling sigma_T baked into the decode graph: the same outputs
    as eager PyTorch. (CUDA graphs and TensorRT need a GPU: benchmarks/run_gpu_checks.sh.)"""
    pytest.importorskip("onnxruntime")
    from dbae.export.onnx_export import export_onnx
    from dbae.export.onnxruntime_runner import OnnxRuntimeRunner
    from dbae.export.runner import DecodeSetting
    from dbae.model import DBAE

    foreign = read_foreign(TINY64, num_head_channels=OFFICIAL_TINY_HEAD_CHANNELS)
    model = DBAE(foreign.preset.model).eval()
    model.load_state_dict(foreign.state)
    model.set_sampling_sigma_T(0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 3, 64, 64), generator=g) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        x_T = model.endpoint(z)
        images = model.decode(z, 1).images
        decoder = torch.compile(model.decoder, backend="aot_eager")
        assert torch.allclose(decoder(z), x_T, atol=1e-6)
    setting = DecodeSetting(1, "euler")
    out = tmp_path / "onnx"
    manifest = export_onnx(model, out, settings=[setting], precisions=("fp32",), preset=foreign.preset.name)
    assert manifest.sampling_sigma_T == 0.0
    runner = OnnxRuntimeRunner(out, "cpu", "fp32", setting, model_config=model.config, threads=1)
    assert (runner.encode(x) - z).abs().max() < 1e-4
    assert (runner.decode(z) - images).abs().max() < 1e-4
