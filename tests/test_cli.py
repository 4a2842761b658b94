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
    with Image.open(grid) as im:  # three rows (input, x_T, reconstruction) of 16x16 images shown 4x
        assert im.height == 2 + 3 * (4 * 16 + 2)
    assert "PSNR" in out
    code, _, _ = run(capsys, "reconstruct", "--ckpt", str(trained_tiny), "--dataset", "shapes", "--n", "6",
                     "--nfe", "2", "--out", str(grid), "--zoom", "1")
    with Image.open(grid) as im:
        assert code == 0 and im.height == 2 + 3 * (16 + 2)
    code, _, err = run(capsys, "reconstruct", "--ckpt", str(trained_tiny), "--dataset", "shapes", "--out",
                       str(grid), "--zoom", "0")
    assert code == 2 and "--zoom must be at least 1" in err


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
    with Image.open(out / "samples" / "final.png") as im:  # input, x_T, recon rows; 16 px enlarged 4x
        assert im.height == 2 + 3 * (4 * 16 + 2)
    # Running it again without --resume would overwrite the run: refused with one clear line.
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--resume" in err and "Traceback" not in err
    code, stdout, _ = run(capsys, *argv[:4], "4", *argv[5:], "--resume", "--zoom", "1")
    assert code == 0 and "step 4" in stdout and "note: --precision" not in stdout
    with Image.open(out / "samples" / "final.png") as im:
        assert im.height == 2 + 3 * (16 + 2)
    # mixed precision is a CUDA feature: on the CPU the run says it trains in fp32
    code, stdout, _ = run(capsys, *argv[:4], "5", *argv[5:], "--resume", "--precision", "bf16")
    assert code == 0 and "note: --precision bf16 is mixed precision on CUDA; on cpu this run trains in fp32" in stdout
    # --eval-images 0: no check after training (eval.json stays the last one); a negative count is refused
    before = (out / "eval.json").read_text()
    code, stdout, _ = run(capsys, *argv[:4], "6", *argv[5:], "--resume", "--eval-images", "0")
    assert code == 0 and "step 6" in stdout and "(no check after training: --eval-images 0)" in stdout
    assert (out / "eval.json").read_text() == before and "trained   :" not in stdout
    code, _, err = run(capsys, *argv, "--eval-images", "-1")
    assert code == 2 and err.strip() == "dbae train: error: --eval-images must be >= 0 (0: no check after training), got -1"


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


# ---------------------------------------------------------------- user mistakes: exit 2, one message, no traceback


def _refused(code: int, err: str, *messages: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for message in messages:
        assert message in err, err


@pytest.mark.parametrize("command", [
    ["encode", "--dataset", "shapes", "--n", "2", "--out", "z.npy"],
    ["reconstruct", "--dataset", "shapes", "--n", "2", "--out", "r.png"],
    ["eval", "recon", "--dataset", "shapes", "--n", "2", "--out", "ev"],
])
def test_batch_size_below_one_is_refused(capsys, trained_tiny, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    head = command[:2] if command[0] == "eval" else command[:1]
    code, _, err = run(capsys, *head, "--ckpt", str(trained_tiny), *command[len(head):], "--batch-size", "0")
    _refused(code, err, "--batch-size must be at least 1, got 0")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_device_name_that_is_no_device_is_refused(capsys, trained_tiny, tmp_path):
    code, _, err = run(capsys, "encode", "--ckpt", str(trained_tiny), "--dataset", "shapes", "--out",
                       str(tmp_path / "z.npy"), "--device", "gpu")
    _refused(code, err, "--device 'gpu' is not a device", "cpu or cuda")
    code, _, err = run(capsys, "train", "--preset", "tiny16", "--steps", "1", "--batch-size", "4", "--out",
                       str(tmp_path / "run"), "--no-progress", "--device", "gpu")
    _refused(code, err, "--device 'gpu' is not a device")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "lr must be > 0, got -1.0"),
    ("--lr", "0", "lr must be > 0, got 0.0"),
    ("--num-workers", "-1", "num_workers must be an integer >= 0, got -1"),
])
def test_train_refuses_a_bad_learning_rate_or_worker_count(capsys, tmp_path, flag, value, message):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--preset", "tiny16", "--steps", "1", "--batch-size", "4", "--out", str(out),
                       "--no-progress", flag, value)
    _refused(code, err, message)
    assert not out.exists()


def _out_cases(ckpt: str) -> list[tuple[list[str], str]]:
    """(argv with FILE for an existing file, expected message): commands whose --out is a folder."""
    return [
        (["train", "--preset", "tiny16", "--steps", "1", "--batch-size", "4", "--no-progress", "--out", "FILE"],
         "--out FILE is an existing file, not a folder"),
        (["train", "--method", "diffae", "--preset", "tiny16", "--steps", "1", "--batch-size", "4", "--no-progress",
          "--out", "FILE"], "--out FILE is an existing file, not a folder"),
        (["train-prior", "--ckpt", ckpt, "--no-progress", "--out", "FILE"], "--out FILE is an existing file"),
        (["generate", "--ckpt", ckpt, "--n", "1", "--no-progress", "--out", "FILE"], "--out FILE is an existing file"),
        (["eval", "recon", "--ckpt", ckpt, "--dataset", "shapes", "--n", "2", "--out", "FILE"],
         "--out FILE is an existing file"),
        (["export", "--ckpt", ckpt, "--steps", "1", "--out", "FILE/sub"], "FILE is a file, not a folder"),
        (["bench", "latency", "--preset", "tiny16", "--out", "FILE"], "--out FILE is an existing file"),
        (["encode", "--ckpt", ckpt, "--dataset", "shapes", "--out", "FILE/z.npy"], "FILE is a file, not a folder"),
        (["reconstruct", "--ckpt", ckpt, "--dataset", "shapes", "--out", "FILE/r.png"], "FILE is a file, not a folder"),
        (["infer-latents", "--ckpt", ckpt, "--n", "4", "--no-progress", "--out", "FILE/l.safetensors"],
         "FILE is a file, not a folder"),
        (["train-classifier", "--ckpt", ckpt, "--dataset", "shapes", "--out", "FILE/c.safetensors"],
         "FILE is a file, not a folder"),
    ]


def test_an_out_path_blocked_by_an_existing_file_is_refused(capsys, trained_tiny, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("my notes\n")
    for argv, message in _out_cases(str(trained_tiny)):
        argv = [a.replace("FILE", str(existing)) for a in argv]
        code, _, err = run(capsys, *argv)
        _refused(code, err, message.replace("FILE", str(existing)))
        assert len(err.strip().splitlines()) == 1, err
        assert existing.read_text() == "my notes\n", argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_folder_given_as_an_output_file_is_refused(capsys, trained_tiny, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    code, _, err = run(capsys, "reconstruct", "--ckpt", str(trained_tiny), "--dataset", "shapes", "--n", "2",
                       "--nfe", "1", "--out", str(tmp_path / "r.png"), "--json", str(folder))
    _refused(code, err, f"--json {folder} is a folder")
    assert not (tmp_path / "r.png").exists()
    for command in (["infer-latents", "--n", "4", "--no-progress"], ["train-classifier", "--dataset", "shapes"]):
        code, _, err = run(capsys, command[0], "--ckpt", str(trained_tiny), *command[1:], "--out", str(folder))
        _refused(code, err, "--out must end in .safetensors")
    assert list(folder.iterdir()) == []


def test_outputs_never_replace_a_checkpoint(capsys, trained_tiny, tmp_path):
    from dbae.checkpoints import resolve_checkpoint

    ckpt = tmp_path / "precious.safetensors"
    ckpt.write_bytes(resolve_checkpoint(trained_tiny).read_bytes())
    before = ckpt.read_bytes()
    for argv in (["encode", "--dataset", "shapes", "--n", "2"],
                 ["infer-latents", "--n", "4", "--no-progress"],
                 ["train-classifier", "--dataset", "shapes", "--n", "8", "--n-val", "4"]):
        code, _, err = run(capsys, argv[0], "--ckpt", str(trained_tiny), *argv[1:], "--out", str(ckpt))
        _refused(code, err, f"--out {ckpt} is a DBAE checkpoint; writing there would replace it")
    assert ckpt.read_bytes() == before
    # the same kind of file is replaced as before (a re-run)
    z = tmp_path / "z.safetensors"
    for _ in range(2):
        code, _, err = run(capsys, "encode", "--ckpt", str(trained_tiny), "--dataset", "shapes", "--n", "2",
                           "--out", str(z))
        assert code == 0, err


def test_train_classifier_out_must_be_safetensors(capsys, trained_tiny, tmp_path):
    # --out c.json used to write the classifier there and then its JSON summary over it
    out = tmp_path / "c.json"
    code, _, err = run(capsys, "train-classifier", "--ckpt", str(trained_tiny), "--dataset", "shapes",
                       "--n", "8", "--n-val", "4", "--out", str(out))
    _refused(code, err, "--out must end in .safetensors, got 'c.json'")
    assert not out.exists()


def _fake_diffae_run(root):
    from safetensors.torch import save_file

    from dbae.baselines.train import FORMAT as DIFFAE_FORMAT

    (root / "checkpoints").mkdir(parents=True)
    save_file({"model.w": torch.zeros(1)}, str(root / "checkpoints" / "step-00000002.safetensors"),
              metadata={"format": DIFFAE_FORMAT, "step": "2"})
    return root


@pytest.mark.parametrize("command", [
    ["info"],
    ["encode", "--dataset", "shapes", "--out", "z.npy"],
    ["interpolate", "--dataset", "shapes", "--n", "2"],
    ["train-prior", "--no-progress"],
    ["export", "--out", "onnx"],
])
def test_dbae_only_commands_say_that_a_diffae_run_is_not_dbae(capsys, tmp_path, monkeypatch, command):
    run_dir = _fake_diffae_run(tmp_path / "diffae")
    monkeypatch.chdir(tmp_path)
    for ckpt in (run_dir, run_dir / "checkpoints" / "step-00000002.safetensors"):
        code, _, err = run(capsys, command[0], "--ckpt", str(ckpt), *command[1:])
        _refused(code, err, "is a DiffAE checkpoint, not a DBAE checkpoint")
        assert len(err.strip().splitlines()) == 1, err


def test_bench_compare_says_which_flag_takes_a_baseline_checkpoint(capsys, tmp_path):
    run_dir = _fake_diffae_run(tmp_path / "diffae")
    code, _, err = run(capsys, "bench", "compare", "--ckpt", str(run_dir), "--methods", "dbae",
                       "--out", str(tmp_path / "cmp"))  # fmt: skip
    _refused(code, err, "is a DiffAE checkpoint", "(to compare it, pass it as --diffae-ckpt)")


def test_a_run_directory_without_checkpoints(capsys, tmp_path):
    code, _, err = run(capsys, "info", "--ckpt", str(tmp_path))
    _refused(code, err, f"no checkpoint in {tmp_path}", "step-*.safetensors")


@pytest.mark.parametrize("flag, value, message", [
    ("--C", "0", "--C (inverse regularisation strength) must be > 0, got 0.0"),
    ("--C", "-1", "must be > 0, got -1.0"),
    ("--ridge", "-1", "--ridge must be >= 0, got -1.0"),
])
def test_eval_probe_refuses_bad_regularisation(capsys, trained_tiny, tmp_path, flag, value, message):
    code, _, err = run(capsys, "eval", "probe", "--ckpt", str(trained_tiny), "--n-train", "8", "--n-test", "4",
                       "--out", str(tmp_path / "ev"), flag, value)
    _refused(code, err, message)


def test_other_kinds_names_every_file_format_of_the_package():
    from dbae.apps.attributes import FORMAT as CLASSIFIER
    from dbae.baselines.pdae_train import FORMAT as PDAE
    from dbae.baselines.train import FORMAT as DIFFAE
    from dbae.prior.checkpoint import FORMAT as PRIOR
    from dbae.prior.latents import FORMAT as LATENTS
    from dbae.checkpoints import OTHER_KINDS

    assert set(OTHER_KINDS) == {DIFFAE, PDAE, PRIOR, LATENTS, CLASSIFIER}


@pytest.mark.parametrize("command", [
    ["reconstruct", "--dataset", "shapes", "--n", "2", "--nfe", "2"],
    ["interpolate", "--dataset", "shapes", "--n", "2", "--steps", "3", "--nfe", "2"],
])  # fmt: skip
def test_a_report_never_replaces_a_file_it_did_not_write(capsys, trained_tiny, tmp_path, command):
    """The JSON report goes next to --out without being named: it may replace an earlier report
    of the same command (a re-run), never anything else (here a training run's eval.json)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "eval.json").write_text('{"mse": 0.01}\n')
    argv = [command[0], "--ckpt", str(trained_tiny), *command[1:], "--out", str(run_dir / "eval.png")]
    code, _, err = run(capsys, *argv)
    _refused(code, err, "eval.json exists and is not a report of `dbae " + command[0] + "`", "choose another --out")
    assert (run_dir / "eval.json").read_text() == '{"mse": 0.01}\n' and not (run_dir / "eval.png").exists()
    out = tmp_path / "grid.png"
    argv[-1] = str(out)
    for _ in range(2):  # the second run replaces the first one's report
        code, _, err = run(capsys, *argv)
        assert code == 0, err
    assert json.loads(out.with_suffix(".json").read_text())["dbae_command"] == command[0]
