import math

import numpy as np
import pytest
import torch
from PIL import Image

from dbae.data import ImageFolderDataset, ShapesDataset, build_dataset
from dbae.data.shapes import (
    COLOURS,
    FACTORS,
    SHAPES,
    factor_column,
    factor_index,
    render,
    sample_factors,
)
from dbae.errors import DataError


# ---------------------------------------------------------------- shapes


def test_shapes_same_index_same_item_across_instances_and_access_order():
    a, b = ShapesDataset(32, length=100, seed=3), ShapesDataset(32, length=100, seed=3)
    forward = [a[i] for i in (5, 6, 7)]
    backward = [b[i] for i in (7, 6, 5)][::-1]
    for (xa, fa), (xb, fb) in zip(forward, backward):
        assert torch.equal(xa, xb) and torch.equal(fa, fb)
    assert torch.equal(a[-1][0], a[99][0])


def test_shapes_seeds_and_splits_differ():
    base = ShapesDataset(16, seed=0).factors_at(range(50))
    assert not torch.allclose(base, ShapesDataset(16, seed=1).factors_at(range(50)))
    assert not torch.allclose(base, ShapesDataset(16, seed=0, split="test").factors_at(range(50)))


def test_shapes_item_types_values_and_factor_ranges():
    ds = ShapesDataset(32, length=500)
    image, factors = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert factors.shape == (len(ds.factor_names),) and factors.dtype == torch.float32
    assert len(ds.factor_names) >= 5

    f = ds.factors_at(range(500))
    for k, spec in enumerate(FACTORS):
        assert spec.description
        assert f[:, k].min() >= spec.low and f[:, k].max() <= spec.high
        if spec.discrete:
            assert torch.equal(f[:, k], f[:, k].round())
            assert set(f[:, k].long().tolist()) == set(range(len(spec.values)))
    assert len(SHAPES) >= 4 and "circle" in SHAPES and "triangle" in SHAPES
    assert 6 <= len(COLOURS) <= 8
    images = render(f[:64], 32)
    assert images.min() >= -1 and images.max() <= 1


def test_factor_column_gives_discrete_indices():
    f = ShapesDataset(8).factors_at(range(20))
    colour = factor_column(f, "colour")
    assert colour.dtype == torch.int64 and colour.max() < len(COLOURS)
    assert torch.equal(factor_column(f, "size"), f[:, factor_index("size")])
    with pytest.raises(ValueError, match="unknown"):
        factor_index("hue")


@pytest.mark.parametrize("size", [16, 33, 64])
def test_shapes_any_resolution(size):
    image, _ = ShapesDataset(size)[1]
    assert image.shape == (3, size, size)
    assert image.min() >= -1 and image.max() <= 1


def test_batched_render_equals_per_item():
    ds = ShapesDataset(24, length=20)
    batch = render(ds.factors_at(range(20)), 24)
    for i in range(20):
        assert torch.equal(batch[i], ds[i][0])


def test_shape_is_drawn_in_its_colour_on_its_background():
    # a large red square in the centre on a black background
    f = torch.tensor([[SHAPES.index("square"), COLOURS.index("red"), 0.45, 0, 0, 0, 0.0]])
    image = (render(f, 64)[0] + 1) / 2
    centre = image[:, 32, 32]
    assert torch.allclose(centre, torch.tensor([1.0, 0.1, 0.1]), atol=1e-6)
    assert torch.all(image[:, 0, 0] == 0)
    # its area matches the analytic square (half side 0.45 / sqrt 2 in half-widths)
    covered = (image[0] - image[0].min()).sum() / (image[0].max() - image[0].min())
    assert covered.item() == pytest.approx((0.45 * math.sqrt(2) * 32) ** 2, rel=0.01)


def test_shapes_stay_inside_the_image():
    f = ShapesDataset(64).factors_at(range(100))
    for name in ("x", "y"):
        f[:, factor_index(name)] = torch.where(f[:, factor_index(name)] > 0, 0.45, -0.45)
    f[:, factor_index("size")] = 0.45
    images = render(f, 64)
    background = f[:, factor_index("background")].view(-1, 1, 1) * 2 - 1
    edges = [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]]
    border = torch.cat(edges, dim=-1)
    assert torch.allclose(border, background.expand_as(border), atol=1e-6)


def test_sample_factors_is_reproducible():
    a = sample_factors(64, torch.Generator().manual_seed(1))
    b = sample_factors(64, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (64, len(FACTORS))
    images = ShapesDataset.render(a, 32)
    assert images.shape == (64, 3, 32, 32)


def test_shapes_bad_arguments():
    with pytest.raises(DataError, match="split"):
        ShapesDataset(split="val")
    with pytest.raises(DataError, match="image size"):
        ShapesDataset(image_size=0)
    with pytest.raises(IndexError):
        ShapesDataset(length=3)[3]


# ---------------------------------------------------------------- folders


def _write(path, mode="RGB", size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgba = np.random.default_rng(len(str(path))).integers(0, 256, (size[1], size[0], 4), np.uint8)
    Image.fromarray(rgba).convert(mode).save(path)
    return path


def test_folder_loads_every_format_recursively_in_sorted_order(tmp_path):
    _write(tmp_path / "b.png")
    _write(tmp_path / "a.JPG")
    _write(tmp_path / "sub" / "c.webp", size=(20, 50))
    _write(tmp_path / "d_gray.png", "L")
    _write(tmp_path / "e_rgba.png", "RGBA")
    _write(tmp_path / "f_palette.png", "P")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 16)
    names = [p.relative_to(tmp_path).as_posix() for p in ds.paths]
    assert names == ["a.JPG", "b.png", "d_gray.png", "e_rgba.png", "f_palette.png", "sub/c.webp"]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert label.shape == (0,)
    gray, _ = ds[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])


def test_folder_without_center_crop_squashes(tmp_path):
    _write(tmp_path / "wide.png", size=(60, 20))
    image, _ = ImageFolderDataset(tmp_path, 12, center_crop=False)[0]
    assert image.shape == (3, 12, 12)


def test_corrupt_file_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
    ds = ImageFolderDataset(tmp_path, 16)
    with pytest.raises(DataError, match=r"broken\.png.*not a readable image"):
        ds[0]


def test_truncated_jpeg_is_an_error_not_a_partial_image(tmp_path):
    path = _write(tmp_path / "cut.jpg", size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg.*not a readable image"):
        ImageFolderDataset(tmp_path, 16)[0]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no images found.*png"):
        ImageFolderDataset(tmp_path, 16)
    with pytest.raises(DataError, match="no such directory"):
        ImageFolderDataset(tmp_path / "missing", 16)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        ImageFolderDataset(tmp_path / "file.txt", 16)


def test_build_dataset(tmp_path):
    shapes = build_dataset("shapes", 16, seed=2, split="test")
    assert isinstance(shapes, ShapesDataset) and shapes.seed == 2 and shapes.split == "test"
    _write(tmp_path / "x.png")
    folder = build_dataset(str(tmp_path), 8)
    assert isinstance(folder, ImageFolderDataset) and folder[0][0].shape == (3, 8, 8)
