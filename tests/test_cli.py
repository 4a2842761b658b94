"""The `dbae` command line, end to end, including its error messages."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dbae.cli.main import main
from dbae.inference import load_model


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_info_prints_ffhq128_parameter_counts_near_the_paper(capsys):
    code, out, _ = run(capsys, "info", "--preset", "ffhq128", "--no-config")
    assert code == 0
    counts = {m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"(\w+)\s+[\d.]+M\s+\(([\d,]+)\)", out)}
    assert set(counts) == {"unet", "encoder", "decoder", "total"}
    assert counts["total"] == counts["unet"] + counts["encoder"] + counts["decoder"]
    assert abs(counts["total"] - 161e6) / 161e6 < 0.10  # paper: about 161M


def test_info_on_a_checkpoint(capsys, trained_tiny):
    code, out, _ = run(capsys, "info", "--ckpt", str(trained_tiny))
    assert code == 0
    assert "preset tiny16" in out and "step 300" in out
    assert '"z_dim": 16' in out


def test_reconstruct_writes_grid_and_metrics(capsys, trained_tiny, tmp_path):
    grid = tmp_path / "rec.png"
    code, out, _ = run(capsys, "reconstruct", "--ckpt", str(trained_tiny), "--dataset", "shapes",
                       "--n", "6", "--nfe", "8", "--out", str(grid))
    assert code == 0
    report = json.loads(grid.with_suffix(".json").read_text())
    assert report["nfe"] == 8 and report["images"] == 6 and report["step"] == 300
    assert 0 < report["mse"] < 0.04 and 0 < report["ssim"] <= 1
    with Image.open(grid) as im:
        assert im.height > 3 * 16  # three rows: input, x_T, reconstruction
    assert "PSNR" in out


def test_encode_matches_the_python_api(capsys, trained_tiny, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    for suffix in (".npy", ".safetensors"):
        out = tmp_path / f"z{suffix}"
        code, _, err = run(capsys, "encode", "--ckpt", str(trained_tiny), "--images", str(images), "--out", str(out))
        assert code == 0, err
        z = np.load(out) if suffix == ".npy" else load_file(str(out))["z"].numpy()
        assert z.shape == (3, 16)
    from dbae.imageio import load_images

    model = load_model(trained_tiny).model
    with torch.no_grad():
        expected = model.encode(load_images(images, 16, exact_size=True)).numpy()
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)


def test_train_command_end_to_end(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny16", "--steps", "2", "--batch-size", "4", "--out", str(out), "--no-progress"]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and "step 2" in stdout
    assert (out / "samples" / "final.png").exists() and (out / "eval.json").exists()
    # Running it again without --resume would overwrite the run: refused with one clear line.
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--resume" in err and "Traceback" not in err
    code, stdout, _ = run(capsys, *argv[:4], "4", *argv[5:], "--resume")
    assert code == 0 and "step 4" in stdout


def _bad_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really an image")
    return folder


@pytest.mark.parametrize("command", ["reconstruct", "encode"])
def test_corrupt_image_gives_one_clear_error(capsys, trained_tiny, tmp_path, command):
    folder = _bad_images(tmp_path)
    extra = ["--out", str(tmp_path / ("o.png" if command == "reconstruct" else "z.npy"))]
    code, _, err = run(capsys, command, "--ckpt", str(trained_tiny), "--images", str(folder), *extra)
    assert code == 2
    assert "broken.png" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_wrong_image_size_is_an_error_unless_resize(capsys, trained_tiny, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 24), (200, 20, 30)).save(folder / "wide.png")
    out = tmp_path / "r.png"
    code, _, err = run(capsys, "reconstruct", "--ckpt", str(trained_tiny), "--images", str(folder), "--out", str(out))
    assert code == 2 and "wide.png" in err and "40x24" in err and "16x16" in err
    code, _, err = run(capsys, "reconstruct", "--ckpt", str(trained_tiny), "--images", str(folder),
                       "--out", str(out), "--resize", "--nfe", "2")
    assert code == 0, err


def test_bad_checkpoints_give_clear_errors(capsys, tmp_path):
    code, _, err = run(capsys, "info", "--ckpt", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "no checkpoint" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "reconstruct", "--ckpt", str(junk), "--dataset", "shapes")
    assert code == 2 and "junk.safetensors" in err and "Traceback" not in err


def test_bad_sampler_arguments(capsys, trained_tiny, tmp_path):
    code, _, err = run(capsys, "reconstruct", "--ckpt", str(trained_tiny), "--dataset", "shapes",
                       "--churn", "1.5", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "churn" in err
    code, _, err = run(capsys, "reconstruct", "--ckpt", str(trained_tiny), "--dataset", "shapes",
                       "--nfe", "1", "--churn", "0.3", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "nfe" in err
