"""Every safetensors file carries the sha256 of its tensor data and metadata, and every load
checks it (and the manifest beside it): a damaged file is one clear error, never a silent
load with wrong weights; older files without the check load with one warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dbae.apps.attributes import AttributeClassifier, load_classifier, save_classifier
from dbae.baselines.config import diffae_preset
from dbae.baselines.train import read_diffae_checkpoint, save_diffae
from dbae.cli.main import main
from dbae.config import get_preset
from dbae.errors import CheckpointError
from dbae.inference import load_model
from dbae.checkpoints.integrity import METADATA_KEY, TENSORS_KEY, read_header, read_safetensors, tensors_sha256
from dbae.prior.config import get_prior_preset
from dbae.prior.checkpoint import load_prior, save_prior
from dbae.prior.identity import AutoencoderRef
from dbae.prior.latents import LatentInfo, LatentSet, load_latents, save_latents
from dbae.prior.network import MLPSkipNet
from dbae.training import TrainOptions, Trainer, override
from dbae.checkpoints import load_checkpoint, write_weights_file


def _data_offset(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


def flip_data_byte(path: Path) -> None:
    """One flipped bit in the middle of the tensor data: the header still parses."""
    raw = bytearray(path.read_bytes())
    start = _data_offset(raw)
    raw[start + (len(raw) - start) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def flip_header_byte(path: Path, text: str) -> None:
    """Change one digit of ``text`` inside the header's metadata (the JSON stays valid)."""
    raw = bytearray(path.read_bytes())
    at = raw[:_data_offset(raw)].index(text.encode())
    pos = at + len(text) - 1
    raw[pos] = ord("7") if raw[pos] != ord("7") else ord("8")
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 64])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run with checkpoints at steps 2 and 4 (and best), manifest beside them."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    preset = override(get_preset("tiny16"), steps=4, batch_size=8, log_every=1, sample_every=1000, ckpt_every=2)
    Trainer(preset, TrainOptions(out=out, progress=False, eval_images=8, log=lambda m: None)).fit()
    return out


def _copy_run(run: Path, dest: Path, manifest: bool = True) -> Path:
    shutil.copytree(run, dest)
    if not manifest:
        (dest / "checkpoints" / "manifest.json").unlink()
    return dest


def _reconstruct(ckpt: Path, tmp_path: Path) -> list[str]:
    return ["reconstruct", "--ckpt", str(ckpt), "--dataset", "shapes", "--n", "2", "--nfe", "2",
            "--out", str(tmp_path / "r.png")]


def test_every_checkpoint_carries_its_own_sha256(run: Path) -> None:
    path = run / "checkpoints" / "step-00000004.safetensors"
    meta = read_header(path)
    assert len(meta[TENSORS_KEY]) == 64 and len(meta[METADATA_KEY]) == 64
    assert meta[TENSORS_KEY] == tensors_sha256(load_file(str(path)))


DAMAGE = {
    "data": (flip_data_byte, "tensor data"),
    "header": (lambda p: flip_header_byte(p, '\\"lr\\": 0.00'), "header metadata"),
    "truncated": (truncate, "truncated"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_file_named_by_path_is_one_clear_error(run: Path, tmp_path: Path, capsys, damage: str) -> None:
    """Copied out of its run (no manifest beside it), the file's own sha256 catches the damage."""
    damage_fn, what = DAMAGE[damage]
    path = tmp_path / "copy.safetensors"
    shutil.copy(run / "checkpoints" / "step-00000004.safetensors", path)
    assert main(_reconstruct(path, tmp_path)) == 0  # intact: loads
    capsys.readouterr()
    damage_fn(path)
    if damage != "truncated":
        load_file(str(path))  # safetensors alone loads it
    assert main(_reconstruct(path, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and what in err[0], err
    for load in (lambda: load_model(path), lambda: load_checkpoint(path), lambda: read_safetensors(path)):
        with pytest.raises(CheckpointError, match=what):
            load()
    assert main(["info", "--ckpt", str(path)]) == 2
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "export")]) == 2
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_file_in_its_run_named_by_path_is_caught_by_the_manifest(run: Path, tmp_path: Path, capsys,
                                                                           damage: str) -> None:
    damage_fn, _ = DAMAGE[damage]
    copy = _copy_run(run, tmp_path / "run")
    path = copy / "checkpoints" / "step-00000004.safetensors"
    damage_fn(path)
    assert main(_reconstruct(path, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "manifest" in err[0], err


@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "without-manifest"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_run_directory_falls_back_past_a_damaged_newest_checkpoint(run: Path, tmp_path: Path, capsys,
                                                                     damage: str, manifest: bool) -> None:
    """By run directory, the damaged newest checkpoint is skipped with a warning on stderr (by
    its manifest entry, or without a manifest by its own sha256) and the previous one is used."""
    damage_fn, _ = DAMAGE[damage]
    copy = _copy_run(run, tmp_path / "run", manifest=manifest)
    damage_fn(copy / "checkpoints" / "step-00000004.safetensors")
    assert main(_reconstruct(copy, tmp_path)) == 0
    captured = capsys.readouterr()  # the warning goes to stderr: stdout is the command's own output
    assert "skipping checkpoint step-00000004.safetensors" in captured.err
    assert "skipping checkpoint" not in captured.out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["checkpoint"].endswith("step-00000002.safetensors") and report["step"] == 2


def test_an_older_file_without_the_check_loads_with_one_warning(run: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "old.safetensors"
    meta = read_header(run / "checkpoints" / "step-00000004.safetensors")
    old_meta = {k: v for k, v in meta.items() if k not in (TENSORS_KEY, METADATA_KEY)}
    save_file(load_file(str(run / "checkpoints" / "step-00000004.safetensors")), str(path), metadata=old_meta)
    first = load_model(path)
    second = load_model(path)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(path) in err and "no sha256" in err
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert main(_reconstruct(path, tmp_path)) == 0


def test_damage_after_a_successful_load_is_still_caught(run: Path, tmp_path: Path) -> None:
    """A file that passed is not hashed again while unchanged, but a change is seen."""
    path = tmp_path / "c.safetensors"
    shutil.copy(run / "checkpoints" / "step-00000004.safetensors", path)
    load_model(path)
    load_model(path)
    flip_data_byte(path)
    with pytest.raises(CheckpointError, match="tensor data"):
        load_model(path)


def test_the_tensor_digest_sees_names_dtypes_shapes_and_values() -> None:
    base = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    digest = tensors_sha256(base)
    assert tensors_sha256(dict(reversed(list(base.items())))) == digest  # order of insertion does not matter
    assert tensors_sha256({**base, "a": base["a"].t().contiguous().t()}) == digest  # layout does not either
    changed = [
        {"c": base["a"], "b": base["b"]},
        {**base, "a": base["a"].reshape(3, 2)},
        {**base, "a": base["a"].to(torch.float64)},
        {**base, "b": base["b"] * 2},
        {**base, "z": torch.zeros(0)},
    ]
    assert all(tensors_sha256(t) != digest for t in changed)


# ----- the other files of the package: each loader checks its file -----
def _latents(path: Path) -> tuple[Path, callable]:
    ref = AutoencoderRef("ab" * 32, "ema", "x.safetensors", 3, "tiny16", 4)
    save_latents(path, LatentSet.from_latents(torch.randn(64, 4), LatentInfo(ref, "shapes", "train", 0, 64, False)))
    return path, load_latents


def _classifier(path: Path) -> tuple[Path, callable]:
    clf = AttributeClassifier(("x",), ("continuous",), torch.randn(1, 4), torch.zeros(1), torch.zeros(4),
                              torch.ones(4), torch.zeros(1), torch.ones(1), {}, {})  # fmt: skip
    save_classifier(path, clf)
    return path, load_classifier


def _diffae(path: Path) -> tuple[Path, callable]:
    state = {"w": torch.randn(64, 64)}
    save_diffae(path, preset=diffae_preset("tiny16"), step=1, model=state, ema=state)
    return path, read_diffae_checkpoint


def _prior(path: Path) -> tuple[Path, callable]:
    preset = get_prior_preset("tiny")
    net = MLPSkipNet(preset.net, 4).state_dict()
    ref = AutoencoderRef("ab" * 32, "ema", "x.safetensors", 3, "tiny16", 4)
    save_prior(path, preset=preset, step=1, model=net, ema=net, mean=torch.zeros(4), std=torch.ones(4),
               autoencoder=ref, latents={})
    return path, load_prior


@pytest.mark.parametrize("make", [_latents, _classifier, _diffae, _prior], ids=lambda f: f.__name__.strip("_"))
def test_every_kind_of_file_is_checked_when_loaded(tmp_path: Path, make) -> None:
    path, load = make(tmp_path / "file.safetensors")
    load(path)
    assert TENSORS_KEY in read_header(path)
    flip_data_byte(path)
    with pytest.raises(CheckpointError, match=f"{path.name} is damaged: its tensor data"):
        load(path)


def test_the_digests_are_a_function_of_the_contents(tmp_path: Path) -> None:
    """The same state written twice carries the same digests (safetensors may order the
    header's metadata differently: the digests do not depend on that)."""
    state = {"w": torch.randn(3, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    a = write_weights_file(tmp_path / "a.safetensors", {"format": "x", "step": "1"}, state, state)
    b = write_weights_file(tmp_path / "b.safetensors", {"step": "1", "format": "x"}, state, state)
    ha, hb = read_header(a), read_header(b)
    assert ha == hb and ha[TENSORS_KEY] == tensors_sha256(load_file(str(a)))
    read_safetensors(a), read_safetensors(b)
