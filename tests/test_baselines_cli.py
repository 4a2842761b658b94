"""``dbae train --method diffae|pdae`` and ``dbae eval`` with the baselines' checkpoints:
tiny runs of a few steps, their checkpoints, exact resume, PDAE's two stages, and one-line
errors for options that do not apply. About 30 s on 2 cores for the whole file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dbae.baselines import diffae_preset, pdae_preset
from dbae.baselines.checkpoints import LoadedBaseline, checkpoint_method, load_any
from dbae.baselines.pdae_train import read_pdae_checkpoint
from dbae.baselines.train import read_diffae_checkpoint
from dbae.cli.main import main
from dbae.errors import CheckpointError
from dbae.inference import LoadedModel

TINY = ["--preset", "tiny16", "--batch-size", "4", "--device", "cpu", "--no-progress"]


def _train(out: Path, method: str, *extra: str) -> int:
    return main(["train", "--method", method, *TINY, "--out", str(out), *extra])


def _one_line_error(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"dbae {command}: error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


class _TinyFeatures(torch.nn.Module):
    """A feature network with the calling convention of NVIDIA's scripted Inception:
    net(x in [0, 255], return_features)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = self.conv(x / 255.0).relu().mean(dim=(2, 3))
        return f if return_features else torch.softmax(self.fc(f), dim=1)


def _tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffae_trains_resumes_exactly_and_evaluates(tmp_path, capsys):
    run, whole = tmp_path / "run", tmp_path / "whole"
    # 2 steps, then --resume to 4: the same weights, EMA and optimizer as 4 steps in one go
    # (only the resumed run checks its reconstructions after training: --eval-images 0 skips the others')
    assert _train(run, "diffae", "--steps", "2", "--log-every", "1", "--ckpt-every", "2", "--eval-images", "0") == 0
    assert not (run / "eval.json").exists()
    assert _train(run, "diffae", "--steps", "4", "--log-every", "1", "--ckpt-every", "2", "--resume", "auto") == 0
    assert _train(whole, "diffae", "--steps", "4", "--log-every", "1", "--ckpt-every", "2", "--eval-images", "0") == 0
    assert not (whole / "eval.json").exists()
    out = capsys.readouterr().out
    assert "trained diffae tiny16 to step 4" in out and "inferred x_T" in out and "random x_T" in out
    last = run / "checkpoints" / "step-00000004.safetensors"
    assert (run / "checkpoints" / "step-00000002.safetensors").is_file() and checkpoint_method(last) == "diffae"
    assert _same(load_file(str(last)), load_file(str(whole / "checkpoints" / "step-00000004.safetensors")))
    ckpt = read_diffae_checkpoint(last)
    assert ckpt.step == 4 and ckpt.preset.model == diffae_preset("tiny16").model
    assert ckpt.preset.train.batch_size == 4 and ckpt.preset.train.steps == 4 and ckpt.optim is not None
    # the loss log holds every window once, across the resume
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "diffae" and config["dataset"] == "shapes" and config["preset"]["name"] == "tiny16"
    # DDIM inversion recovers what z misses, a random x_T does not (after 4 steps, DiffAE's own
    # 250 + 100-step DDIM: MSE 0.057 against 0.31 from a random x_T)
    post = json.loads((run / "eval.json").read_text())
    assert post["step"] == 4 and post["inferred"]["mse"] < 0.3 * post["random"]["mse"]

    loaded = load_any(run)
    assert isinstance(loaded, LoadedBaseline) and loaded.method == "diffae" and loaded.step == 4 and loaded.path == last
    ev = tmp_path / "eval"
    common = ["--ckpt", str(run), "--dataset", "shapes", "--n", "6", "--out", str(ev)]
    assert main(["eval", "recon", *common, "--inversion-steps", "8", "--decode-steps", "5"]) == 0
    inferred = json.loads((ev / "recon.json").read_text())
    assert main(["eval", "recon", *common, "--x-T", "random", "--decode-steps", "5"]) == 0
    random = json.loads((ev / "recon.json").read_text())
    assert inferred["method"] == "diffae" and inferred["step"] == 4 and inferred["x_T"] == "inferred"
    assert (inferred["inversion_steps"], inferred["decode_steps"], inferred["nfe"]) == (8, 5, 13)
    assert (random["x_T"], random["inversion_steps"], random["nfe"]) == ("random", 0, 5)
    # 8-step inversion, 5-step decode on DiffAE's grids after 4 training steps: MSE 0.091 against 0.34
    assert inferred["mse"] < 0.5 * random["mse"] and inferred["images"] == random["images"] == 6
    # FID of its reconstructions (a scripted stand-in for Inception): DDIM-inverted x_T gives
    # images like the data, a random x_T after 4 training steps does not
    extractor = tmp_path / "features.pt"
    torch.manual_seed(0)
    torch.jit.script(_TinyFeatures()).save(str(extractor))
    fids = {}
    for mode in ("inferred", "random"):
        assert main(["eval", "fid", "--ckpt", str(run), "--inception", str(extractor), "--n", "16", "--x-T", mode,
                     "--decode-steps", "5", *([] if mode == "random" else ["--inversion-steps", "8"]),
                     "--out", str(ev)]) == 0  # fmt: skip
        report = json.loads((ev / "fid.json").read_text())
        assert report["method"] == "diffae" and report["fake"] == f"reconstructions ({mode} x_T)"
        fids[mode] = report["fid"]
    assert 0 <= fids["inferred"] < fids["random"]
    # dbae reconstruct: the same reconstructions as eval recon, a grid of inputs and results
    grid = tmp_path / "rec.png"
    assert main(["reconstruct", "--ckpt", str(run), "--dataset", "shapes", "--n", "6", "--x-T", "random",
                 "--decode-steps", "5", "--out", str(grid)]) == 0  # fmt: skip
    rec = json.loads(grid.with_suffix(".json").read_text())
    assert (rec["method"], rec["x_T"], rec["nfe"], rec["images"]) == ("diffae", "random", 5, 6)
    assert rec["mse"] == pytest.approx(random["mse"], rel=1e-6)  # same seed, images and steps as eval recon
    assert "5 steps (random x_T)" in capsys.readouterr().out
    assert main(["reconstruct", "--ckpt", str(run), "--dataset", "shapes", "--nfe", "4", "--out", str(grid)]) == 2
    assert "--nfe is a DBAE option" in _one_line_error(capsys, "reconstruct")
    assert main(["eval", "probe", "--ckpt", str(run), "--n-train", "64", "--n-test", "32", "--out", str(ev)]) == 0
    probe = json.loads((ev / "probe.json").read_text())
    assert probe["method"] == "diffae" and probe["z_dim"] == 16 and 0.0 <= probe["classification"]["map"] <= 1.0
    assert main(["eval", "tad", "--ckpt", str(last), "--n-test", "64", "--out", str(ev)]) == 0
    assert json.loads((ev / "tad.json").read_text())["method"] == "diffae"


def test_pdae_trains_both_stages_and_reuses_stage_1(tmp_path, capsys):
    run, reuse = tmp_path / "run", tmp_path / "reuse"
    assert _train(run, "pdae", "--steps", "3", "--pdae-ddpm-steps", "2") == 0
    stage1 = run / "ddpm" / "checkpoints" / "step-00000002.safetensors"
    stage2 = run / "checkpoints" / "step-00000003.safetensors"
    assert read_pdae_checkpoint(stage1).stage == "ddpm" and read_pdae_checkpoint(stage2).stage == "pdae"
    assert read_pdae_checkpoint(stage2).preset.model == pdae_preset("tiny16").model
    assert json.loads((run / "config.json").read_text())["ddpm"] == str(stage1)
    # stage 2 froze stage 1's EMA eps network: its weights and EMA hold it unchanged
    ddpm_eps = {k[len("ema."):]: v for k, v in _tensors(stage1, "ema.eps_net.").items()}
    for group in ("model.", "ema."):
        got = {k[len(group):]: v for k, v in _tensors(stage2, group + "eps_net.").items()}
        assert ddpm_eps and _same(got, ddpm_eps), group
    # --pdae-ddpm-ckpt skips stage 1; from the same DDPM and seed, stage 2 comes out identical
    assert _train(reuse, "pdae", "--steps", "3", "--pdae-ddpm-ckpt", str(run / "ddpm"), "--eval-images", "0") == 0
    assert not (reuse / "ddpm").exists()
    assert _same(load_file(str(stage2)), load_file(str(reuse / "checkpoints" / "step-00000003.safetensors")))
    out = capsys.readouterr().out
    assert "trained pdae tiny16 to step 3" in out and "stage 1" in out

    loaded = load_any(run)
    assert isinstance(loaded, LoadedBaseline) and loaded.method == "pdae" and loaded.stage == "pdae"
    ev = tmp_path / "eval"
    assert main(["eval", "recon", "--ckpt", str(run), "--dataset", "shapes", "--n", "4", "--x-T", "random",
                 "--decode-steps", "4", "--out", str(ev)]) == 0  # fmt: skip
    report = json.loads((ev / "recon.json").read_text())
    assert report["method"] == "pdae" and report["nfe"] == 4 and report["network_evals"] == 8
    assert main(["eval", "recon", "--ckpt", str(run / "ddpm"), "--dataset", "shapes", "--n", "4",
                 "--out", str(ev)]) == 2  # fmt: skip
    assert "stage-1 checkpoint" in _one_line_error(capsys, "eval")


@pytest.mark.parametrize("argv, words", [
    (["--method", "diffae", "--precision", "bf16"], "--precision is an option of the DBAE trainer"),
    (["--method", "pdae", "--grad-accum", "2", "--compile"], "--grad-accum, --compile are options of the DBAE"),
    (["--method", "diffae", "--keep-last", "2"], "--keep-last is an option of the DBAE trainer"),
    (["--method", "diffae", "--channels-last"], "--channels-last is an option of the DBAE trainer"),
    (["--method", "diffae", "--sample-every", "5", "--num-workers", "1", "--tc-weight", "0.1"],
     "--sample-every, --num-workers, --tc-weight are options"),
    (["--pdae-ddpm-ckpt", "x"], "--pdae-ddpm-ckpt only applies to --method pdae, not --method dbae"),
    (["--method", "diffae", "--pdae-ddpm-steps", "2"], "--pdae-ddpm-steps only applies to --method pdae"),
    (["--method", "diffae", "--steps", "0"], "steps must be an integer >= 1"),
    (["--method", "pdae", "--pdae-ddpm-ckpt", "missing.safetensors"], "--pdae-ddpm-ckpt: no checkpoint at"),
])  # fmt: skip
def test_options_that_do_not_apply_give_one_line_errors(tmp_path, capsys, argv, words):
    assert main(["train", "--preset", "tiny16", "--out", str(tmp_path / "run"), "--no-progress", *argv]) == 2
    assert words in _one_line_error(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_baselines_refuse_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", "--method", "diffae", "--preset", "tiny16", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert "--method diffae trains in one process" in _one_line_error(capsys)
    monkeypatch.setenv("RANK", "1")  # the other ranks stay silent: rank 0 reports the error
    assert main(argv) == 2 and capsys.readouterr().err == ""


def test_run_directories_do_not_mix_methods(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "diffae", "--steps", "1", "--eval-images", "0") == 0
    capsys.readouterr()
    for method in ("dbae", "pdae"):
        assert _train(run, method, "--steps", "1", "--resume") == 2
        assert "holds a DiffAE run, not a" in _one_line_error(capsys)
    assert _train(run, "diffae", "--steps", "2") == 2  # not without --resume
    assert "already holds a run" in _one_line_error(capsys)


def test_eval_options_of_the_other_kind_of_checkpoint(tmp_path, capsys):
    dbae_run, diffae_run, ev = tmp_path / "dbae", tmp_path / "diffae", tmp_path / "eval"
    assert _train(dbae_run, "dbae", "--steps", "1", "--eval-images", "0") == 0
    assert _train(diffae_run, "diffae", "--steps", "1", "--eval-images", "0") == 0
    capsys.readouterr()
    common = ["--dataset", "shapes", "--n", "2", "--out", str(ev)]
    # a DBAE checkpoint: reconstruction as before (no method field, its sampler settings)
    assert isinstance(load_any(dbae_run), LoadedModel)
    assert main(["eval", "recon", "--ckpt", str(dbae_run), *common, "--nfe", "2"]) == 0
    report = json.loads((ev / "recon.json").read_text())
    assert "method" not in report and (report["nfe"], report["sampler"], report["churn"]) == (2, "euler", 0.0)
    capsys.readouterr()
    assert main(["eval", "recon", "--ckpt", str(dbae_run), *common, "--x-T", "random"]) == 2
    assert "--x-T only applies to DiffAE / PDAE checkpoints" in _one_line_error(capsys, "eval")
    assert main(["eval", "recon", "--ckpt", str(diffae_run), *common, "--nfe", "4", "--sampler", "heun"]) == 2
    assert "--nfe, --sampler are DBAE options" in _one_line_error(capsys, "eval")
    assert main(["eval", "recon", "--ckpt", str(diffae_run), *common, "--x-T", "random",
                 "--inversion-steps", "5"]) == 2  # fmt: skip
    assert "--inversion-steps applies to --x-T inferred" in _one_line_error(capsys, "eval")
    assert main(["eval", "recon", "--ckpt", str(diffae_run), *common, "--decode-steps", "1001"]) == 2
    assert "decode steps must lie in [1, 1000]" in _one_line_error(capsys, "eval")
    assert main(["eval", "fid", "--ckpt", str(diffae_run), "--fake", "samples", "--inception", "x.pth",
                 "--out", str(ev)]) == 2  # fmt: skip
    assert "draws from a DBAE latent prior" in _one_line_error(capsys, "eval")
    assert main(["eval", "fid", "--ckpt", str(diffae_run), "--nfe", "4", "--inception", "x.pth",
                 "--out", str(ev)]) == 2  # fmt: skip
    assert "--nfe is a DBAE option" in _one_line_error(capsys, "eval")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign), metadata={"format": "something-else/1"})
    assert main(["eval", "probe", "--ckpt", str(foreign), "--out", str(ev)]) == 2
    assert "is not a DBAE, DiffAE or PDAE checkpoint" in _one_line_error(capsys, "eval")
    with pytest.raises(CheckpointError, match="not a DBAE, DiffAE or PDAE"):
        checkpoint_method(foreign)
