import numpy as np
import pytest
import torch
from PIL import Image

from dbae.errors import DataError
import struct
import zlib

from dbae.cli.main import main
from dbae.imageio import (
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_rgb,
    load_image,
    load_images,
    max_image_pixels,
    save_grid,
    save_image,
    set_max_image_pixels,
    to_uint8,
)


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
    save_grid(path, rows, padding=2, zoom=1)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (2 + 4 * 18, 2 + 3 * 18)
        assert im.getpixel((2, 2)) == (128, 128, 128)
        assert im.getpixel((0, 0)) == (255, 255, 255)

    save_grid(path, rows, ["original", "x_T", "reconstruction"], padding=2, zoom=1)
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


@pytest.mark.parametrize("side, zoom", [(8, 8), (16, 4), (20, 4), (32, 2), (64, 1), (128, 1)])
def test_save_grid_enlarges_small_images_with_nearest_pixels(tmp_path, side, zoom):
    """By default every image grows to at least 64 pixels a side, each pixel a zoom x zoom
    block of its own value; 64 pixels and more stay 1x."""
    rows = [torch.rand(3, 3, side, side) * 2 - 1, torch.rand(2, 3, side, side) * 2 - 1]
    path = tmp_path / "grid.png"
    save_grid(path, rows, padding=2)
    cell = side * zoom
    grid = np.asarray(Image.open(path))
    assert grid.shape[:2] == (2 + 2 * (cell + 2), 2 + 3 * (cell + 2))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = 2 + r * (cell + 2), 2 + c * (cell + 2)
            tile = grid[top:top + cell, left:left + cell]
            expected = to_uint8(image).repeat(zoom, axis=0).repeat(zoom, axis=1)
            assert np.array_equal(tile, expected)


def test_save_grid_zoom_1_keeps_1x_and_bad_zooms_are_refused(tmp_path):
    rows = [torch.zeros(2, 3, 16, 16)]
    save_grid(tmp_path / "g.png", rows, padding=2, zoom=1)
    assert Image.open(tmp_path / "g.png").size == (2 + 2 * 18, 2 + 18)
    save_grid(tmp_path / "g.png", rows, padding=2, zoom=3)
    assert Image.open(tmp_path / "g.png").size == (2 + 2 * 50, 2 + 50)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="zoom"):
            save_grid(tmp_path / "g.png", rows, zoom=bad)


# ----- the pixel limit of every read -----
def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data (a bomb's shape:
    a few bytes that would decode to gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def limit():
    """Restores the process's pixel limit after the test."""
    saved = max_image_pixels()
    yield
    set_max_image_pixels(saved)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, limit):
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 64_000_000
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(12000, 12000))  # 144 megapixels: Pillow alone only warns
    with pytest.raises(DataError, match=r"bomb\.png: image is 12000x12000 pixels, 144\.0 megapixels, over the limit "
                                        r"of 64 megapixels.*--max-megapixels"):
        load_image(path, 16)
    with pytest.raises(DataError, match="over the limit"):
        decode_rgb(path.read_bytes(), "upload")
    with pytest.raises(DataError, match="over the limit"):  # Pillow's own guard (> 2x its limit) says the same
        decode_rgb(_png_claiming(40000, 40000), "upload")


@pytest.mark.parametrize("side", [11, 15])
def test_the_limit_is_exact_and_can_be_changed(tmp_path, limit, side):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(image)
    set_max_image_pixels(side * side)
    assert load_image(image).shape == (3, side, side)
    set_max_image_pixels(side * side - 1)
    with pytest.raises(DataError, match="over the limit"):
        load_image(image)
    assert load_image(image, max_pixels=side * side).shape == (3, side, side)  # a per-call limit
    with pytest.raises(DataError, match="positive"):
        set_max_image_pixels(0)


def test_cli_max_megapixels(tmp_path, capsys, trained_tiny, limit):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(12000, 12000))
    args = ["reconstruct", "--ckpt", str(trained_tiny), "--images", str(path), "--resize", "--out",
            str(tmp_path / "r.png")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "over the limit of 64 megapixels" in err[0] and "--max-megapixels" in err[0]
    # raised, the file is decoded (and its missing data is the error now)
    assert main([*args, "--max-megapixels", "150"]) == 2
    err = capsys.readouterr().err
    assert "not a readable image" in err and "over the limit" not in err
    assert main([*args, "--max-megapixels", "0"]) == 2
    assert "--max-megapixels must be a positive number" in capsys.readouterr().err
