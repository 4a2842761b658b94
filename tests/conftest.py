"""Shared fixtures: one tiny model trained once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

# Triton decides at import whether its kernels run in the CPU interpreter, and several
# modules may import it (dbae.kernels, torch.library internals): set the switch before
# any of them, so that the Triton kernels are tested through the interpreter on the CPU.
# (Training never uses the interpreter: see dbae.model.fused_training.)
import torch  # noqa: E402  (torch itself does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The runners' caches (the onnxruntime-step export, TensorRT engines) go to a folder of this
# test session, never to the user's ~/.cache/dbae (servers started by the tests inherit it).
if "DBAE_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DBAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="dbae-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DBAE_CACHE_DIR"], ignore_errors=True)

import pytest

from dbae.config import get_preset
from dbae.training import TrainOptions, Trainer, override

@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Plain float32 convolutions and matmuls on CUDA for one test (TF32 rounds their inputs),
    restored afterwards. (Not monkeypatch: torch's backend flags are properties of module-like
    objects, not attributes it can restore; pytest 9.2 fails at teardown on them.)"""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


#: steps of the shared tiny run (tiny16 preset, seeded)
TINY_STEPS = 300


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> Path:
    """Run directory of a tiny16 model trained for TINY_STEPS steps on built-in shapes."""
    out = tmp_path_factory.mktemp("tiny_run")
    preset = override(get_preset("tiny16"), steps=TINY_STEPS, sample_every=10_000, ckpt_every=TINY_STEPS)
    Trainer(preset, TrainOptions(out=out, progress=False, eval_images=32, log=lambda m: None)).fit()
    return out


#: steps of the shared applications run (shapes16 networks; about a minute on 2 cores)
SHAPES_STEPS = 1000


@pytest.fixture(scope="session")
def trained_shapes(tmp_path_factory) -> Path:
    """Run directory of the shapes16 networks as DBAE-d (the paper's deterministic encoder)
    trained for SHAPES_STEPS steps (seeded), for the applications' tests (prior,
    interpolation, attribute directions). Trained once per test session.

    DBAE-d, because its z learns the factors far sooner: after these 1000 steps a held-out
    linear probe on z finds colour with mAP 0.88 and the centre with Pearson r 0.82 (x) and
    0.72 (y), where the stochastic encoder's z had colour mAP 0.29 (chance: 0.125) and r 0.27
    and 0.34 (measured 2026-11-26, before issue 22 started its sig small; the background is
    r 0.999 for both). Since that fix the stochastic encoder learns the position sooner than
    DBAE-d (docs/results.md); the fixture keeps DBAE-d, whose values the tests were set on."""
    out = tmp_path_factory.mktemp("shapes_run")
    preset = override(get_preset("shapes16"), steps=SHAPES_STEPS, sample_every=10_000, ckpt_every=SHAPES_STEPS)
    encoder = replace(preset.model.encoder, stochastic=False)
    preset = replace(preset, model=replace(preset.model, encoder=encoder))
    Trainer(preset, TrainOptions(out=out, progress=False, eval_images=32, log=lambda m: None)).fit()
    return out


#: data made with the DBAE authors' code (see tests/fixtures/official_dbae/README.md)
def perturbed_tiny16(seed: int):
    """tiny16 with random weights (``seed``), perturbed so that no zero-initialised layer hides
    a mistake; in eval mode."""
    from dbae.model import DBAE

    torch.manual_seed(seed)
    m = DBAE(get_preset("tiny16").model).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


OFFICIAL_DBAE = Path(__file__).parent / "fixtures" / "official_dbae"
#: the tiny fixtures' U-Net attention heads: 16 channels (the released models': 64)
OFFICIAL_TINY_HEAD_CHANNELS = 16


@pytest.fixture(scope="session")
def imported_tiny128(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, classifier file): the authors' tiny 128 px DBAE-d checkpoint imported by
    `dbae import`, and a random 40-attribute classifier saved as the authors' ``best.pt`` (the
    state dict of an ``nn.Linear(z_dim, 40)``) imported for it by `dbae import --classifier`."""
    from dbae.cli.main import main

    root = tmp_path_factory.mktemp("imported")
    run = root / "tiny128"
    source = OFFICIAL_DBAE / "tiny128_det" / "ema_0.9999_000000.pt"
    assert main(["import", str(source), "--out", str(run),
                 "--num-head-channels", str(OFFICIAL_TINY_HEAD_CHANNELS)]) == 0  # fmt: skip
    torch.manual_seed(40)
    best = root / "best.pt"
    torch.save(torch.nn.Linear(16, 40).state_dict(), best)
    classifier = root / "celeba40.safetensors"
    assert main(["import", str(best), "--classifier", "--for", str(run), "--out", str(classifier)]) == 0
    return run, classifier
