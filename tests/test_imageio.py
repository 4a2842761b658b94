import numpy as np
import pytest
import torch
from PIL import Image

from dbae.errors import DataError
from dbae.imageio import load_image, load_images, save_grid, save_image, to_uint8


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_load_image_values_and_native_size(tmp_path):
    array = np.zeros((5, 7, 3), np.uint8)
    array[0, 0] = (255, 0, 128)
    image = load_image(_save(tmp_path / "a.png", array))
    assert image.shape == (3, 5, 7)
    assert image[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    assert image[:, 1, 1].tolist() == [-1.0, -1.0, -1.0]


def test_load_image_resizes_shorter_side_and_crops_the_centre(tmp_path):
    array = np.zeros((20, 60, 3), np.uint8)
    array[:, 20:40] = 255  # the centre square is white, the sides black
    image = load_image(_save(tmp_path / "wide.png", array), 10)
    assert image.shape == (3, 10, 10)
    assert image[:, :, 2:8].min() > 0.99


def test_transparent_pixels_become_white(tmp_path):
    array = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    image = load_image(_save(tmp_path / "t.png", array))
    assert torch.all(image == 1)


def test_exact_size_mismatch_names_file_and_both_sizes(tmp_path):
    path = _save(tmp_path / "small.png", np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(DataError, match=r"small\.png.*12x8.*16x16"):
        load_image(path, 16, exact_size=True)
    assert load_image(path, 16).shape == (3, 16, 16)
    square = _save(tmp_path / "ok.png", np.zeros((16, 16, 3), np.uint8))
    assert load_image(square, 16, exact_size=True).shape == (3, 16, 16)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png.*no such file"):
        load_image(tmp_path / "nope.png")


def test_load_images_from_dir_and_list(tmp_path):
    a = _save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    b = _save(tmp_path / "b.png", np.zeros((6, 9, 3), np.uint8))
    assert load_images(tmp_path, 4).shape == (2, 3, 4, 4)
    assert load_images([a], None).shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match=r"b\.png.*9x6"):
        load_images([a, b])


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5).expand(3, 1, 5)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_save_image_round_trip(tmp_path):
    x = torch.rand(3, 9, 11) * 2 - 1
    path = tmp_path / "deep" / "dir" / "x.png"
    save_image(path, x)
    assert torch.allclose(load_image(path), x, atol=1 / 127.5 + 1e-6)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left


def test_save_grid_pixel_size(tmp_path):
    rows = [torch.zeros(4, 3, 16, 16), torch.randn(4, 3, 16, 16) * 3, torch.ones(4, 3, 16, 16)]
    path = tmp_path / "grid.png"
    save_grid(path, rows, padding=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (2 + 4 * 18, 2 + 3 * 18)
        assert im.getpixel((2, 2)) == (128, 128, 128)
        assert im.getpixel((0, 0)) == (255, 255, 255)

    save_grid(path, rows, ["original", "x_T", "reconstruction"], padding=2)
    with Image.open(path) as im:
        assert im.size[1] == 2 + 3 * 18 and im.size[0] > 2 + 4 * 18
        labels = np.asarray(im)[:, : im.size[0] - 4 * 18]
        assert (labels < 128).any()  # some dark label text was drawn


def test_save_grid_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        save_grid(tmp_path / "g.png", [torch.zeros(1, 3, 4, 4)], ["a", "b"])
    with pytest.raises(ValueError, match="row"):
        save_grid(tmp_path / "g.png", [torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5, 4)])
    with pytest.raises(DataError, match=r"g\.xyz"):
        save_grid(tmp_path / "g.xyz", [torch.zeros(1, 3, 4, 4)])
