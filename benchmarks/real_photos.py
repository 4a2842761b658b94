#!/usr/bin/env python
"""Real-data check of the quick start: the ``shapes16`` preset (16x16, 16-dim z) trained on a
folder of 16x16 crops of the photographs and scans that ship inside scikit-image (nothing is
downloaded), against a linear autoencoder of the same code size (PCA with z_dim components
fitted on the training crops), both measured on crops of held-out photographs in the same run.

    OMP_NUM_THREADS=1 python benchmarks/real_photos.py     # about 10 min on one CPU core
    python benchmarks/real_photos.py --steps 3 --crops 2 --work /tmp/rp --json /tmp/rp.json --grid /tmp/rp.png

The photographs: every file of ``skimage/data`` in :data:`PHOTOS` (photographs of people,
animals, objects and textures, microscope and retina scans, a telescope image, a scanned
page). Each is scaled so that its shorter side is each of :data:`SCALES` pixels (a whole-photo
thumbnail down to a local patch), and ``--crops`` random 16x16 crops are cut at each scale
(seeded). Every fifth photograph (:data:`HELD_OUT`) gives only held-out crops: no crop of it
is trained on or fitted by PCA. Crops are written as PNG files to ``<work>/train`` and
``<work>/test``, and DBAE is trained on the ``train`` folder with ``dbae train``'s trainer
(the preset's settings: 4000 steps, batch 32, seed 0). Measured on every held-out crop:
MSE / PSNR / SSIM on [0, 1] of DBAE's reconstruction (EMA weights, x_T = Dec(z), 10 NFE
Euler), of the PCA reconstruction, and of the training crops' mean image, overall and per
held-out photograph; writes a JSON file and a grid (inputs, PCA, DBAE's x_T, DBAE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dbae.config import get_preset
from dbae.data.folder import ImageFolderDataset
from dbae.errors import DBAEError
from dbae.imageio import open_rgb, save_grid
from dbae.inference import load_model
from dbae.metrics import summarize
from dbae.training import TrainOptions, Trainer, override

#: scikit-image's bundled photographs and scans (its synthetic images, the horse silhouette
#: and the second view of the stereo pair are left out)
PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip
#: every fifth photograph (sorted order, starting at the fifth) is held out
HELD_OUT = PHOTOS[4::5]
#: shorter side of the scaled photograph, in pixels, before the 16x16 crops are cut
SCALES = (24, 32, 48, 64, 96, 128)


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def write_crops(source: Path, work: Path, size: int, crops: int, seed: int) -> dict[str, list[str]]:
    """Cut the crops of every photograph into ``work/train`` and ``work/test`` (PNG); returns
    the photographs of each split. Existing crops are rewritten (the same files for a seed)."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for name in PHOTOS:
        split = "test" if name in HELD_OUT else "train"
        splits[split].append(name)
        folder = work / split
        folder.mkdir(parents=True, exist_ok=True)
        photo = open_rgb(source / name)
        w, h = photo.size
        stem = Path(name).stem
        for side in SCALES:
            scale = side / min(w, h)
            scaled = photo.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
            for k in range(crops):
                left = int(rng.integers(0, scaled.width - size + 1))
                top = int(rng.integers(0, scaled.height - size + 1))
                scaled.crop((left, top, left + size, top + size)).save(folder / f"{stem}-s{side:03d}-{k:03d}.png")
    return splits


def load_folder(folder: Path, size: int) -> tuple[torch.Tensor, list[str]]:
    data = ImageFolderDataset(folder, size)
    return torch.stack([data[i][0] for i in range(len(data))]), data.item_names


def pca_autoencoder(train: torch.Tensor, test: torch.Tensor, d: int) -> torch.Tensor:
    """Reconstructions of ``test`` by the best rank-``d`` linear code of ``train`` (PCA: the
    mean plus the projection on the top ``d`` principal directions), clamped to [-1, 1]."""
    x = train.flatten(1).double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vh[:d]  # (d, pixels)
    y = test.flatten(1).double() - mean
    return ((y @ basis.T) @ basis + mean).clamp(-1, 1).float().view_as(test)


def stats(images: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return summarize((images.float() + 1) / 2, (target.float() + 1) / 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="shapes16", help="the DBAE preset (default: the quick start's)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--crops", type=int, default=48, help="crops per photograph and scale (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and of training")
    p.add_argument("--work", type=Path, default=Path("runs/real_photos"), help="crops and the DBAE run")
    p.add_argument("--json", type=Path, default=Path("docs/data/real_photos_shapes16_cpu.json"))
    p.add_argument("--grid", type=Path, default=Path("docs/real_photos_shapes16.png"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    began = time.perf_counter()
    load_before = os.getloadavg()
    try:
        preset = get_preset(args.preset)
        size = preset.model.image_size
        splits = write_crops(skimage_data_dir(), args.work, size, args.crops, args.seed)
        train_x, _ = load_folder(args.work / "train", size)
        test_x, test_names = load_folder(args.work / "test", size)
        steps = args.steps or preset.train.steps
        preset = override(preset, steps=steps, seed=args.seed, dataset=str(args.work / "train"),
                          sample_every=steps, ckpt_every=steps)  # fmt: skip
        trained_at = time.perf_counter()
        Trainer(preset, TrainOptions(out=args.work / "run", resume=True, progress=not args.no_progress)).fit()
        train_seconds = time.perf_counter() - trained_at
        model = load_model(args.work / "run").model
    except DBAEError as exc:
        print(f"real_photos.py: error: {exc}", file=sys.stderr)
        return 2
    with torch.no_grad():
        recs = [model.reconstruct(chunk, preset.train.sample_nfe) for chunk in test_x.split(256)]
    dbae_images = torch.cat([r.images for r in recs])
    x_T = torch.cat([r.x_T for r in recs])
    nfe = recs[0].nfe
    d = preset.model.z_dim
    pca_images = pca_autoencoder(train_x, test_x, d)
    mean_image = train_x.mean(0, keepdim=True).expand_as(test_x)
    methods = {f"DBAE ({nfe} NFE)": dbae_images, f"PCA (d = {d})": pca_images, "mean image": mean_image}
    rows = [{"method": m, **stats(images, test_x)} for m, images in methods.items()]
    endpoint_mse = float(((x_T - test_x) ** 2).mean() / 4)  # on [0, 1], like the rows
    photo_of = [n.split("-s")[0] for n in test_names]
    per_photo = []
    for stem in sorted(set(photo_of)):
        idx = torch.tensor([i for i, s in enumerate(photo_of) if s == stem])
        per_photo.append({"photo": stem, "crops": len(idx),
                          **{m: stats(images[idx], test_x[idx]) for m, images in methods.items()}})  # fmt: skip
    result = {
        "config": {"preset": args.preset, "steps": steps, "batch_size": preset.train.batch_size, "z_dim": d,
                   "crops_per_photo_and_scale": args.crops, "scales": list(SCALES), "seed": args.seed,
                   "photos": splits, "train_crops": int(train_x.shape[0]), "test_crops": int(test_x.shape[0])},
        "meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "device": f"CPU ({platform.machine()})",
                 "load_average_before": load_before, "load_average_after": os.getloadavg(),
                 "train_seconds": train_seconds, "seconds": time.perf_counter() - began},
        "reconstruction": rows,
        "endpoint": {"mse_x_T": endpoint_mse, "mse_mean_image": rows[-1]["mse"]},
        "per_photo": per_photo,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    shown = torch.linspace(0, test_x.shape[0] - 1, 12).round().long()
    save_grid(args.grid, [test_x[shown], pca_images[shown], x_T[shown], dbae_images[shown]],
              ["held-out input", f"PCA (d = {d})", "DBAE x_T", f"DBAE ({nfe} NFE)"])  # fmt: skip
    print(f"{'method':<16} {'MSE':>8} {'PSNR':>7} {'SSIM':>7}   ({test_x.shape[0]} held-out crops of "
          f"{', '.join(splits['test'])}; trained on {train_x.shape[0]} crops, {steps} steps)")
    for r in rows:
        print(f"{r['method']:<16} {r['mse']:8.5f} {r['psnr']:7.2f} {r['ssim']:7.4f}")
    print(f"DBAE endpoint x_T: MSE {endpoint_mse:.5f} (mean image {rows[-1]['mse']:.5f})")
    print(f"wrote {args.json} and {args.grid} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
