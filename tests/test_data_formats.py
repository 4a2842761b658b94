"""Datasets at scale: LMDB (DiffAE / official DBAE layout) and its converter, zip files,
CelebA-style attribute labels, and multi-worker DataLoaders over them."""

from __future__ import annotations

import io
import pickle
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dbae.cli.main import main
from dbae.data import (
    AttributeDataset,
    ImageFolderDataset,
    LMDBDataset,
    ShapesDataset,
    ZipImageDataset,
    build_dataset,
    dataset_kind,
    read_attribute_table,
    read_celeba_attributes,
)
from dbae.data.build_lmdb import build_lmdb
from dbae.data.lmdb_dataset import close_envs
from dbae.errors import DataError

lmdb = pytest.importorskip("lmdb")

N = 8


@pytest.fixture(autouse=True)
def _close_lmdb_envs():
    yield
    close_envs()  # this process keeps one environment per LMDB open until told otherwise


def _noise_images(folder, n=N, size=(16, 16)):
    """Random RGB PNGs named img0..img{n-1} (lossless: exact pixels are known)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(folder / f"img{i}.png")
    return folder


def _smooth_images(folder, n=N, size=16):
    """Smooth gradient images (what JPEG is made for), as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        rgb = np.stack([x, y, (x + y) / 2 * (i + 1) / n], axis=-1) * 200 + 20
        Image.fromarray(rgb.round().astype(np.uint8)).save(folder / f"{i:06d}.png")
    return folder


def _images(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _write_raw_lmdb(path, records: dict, subdir=True):
    """An LMDB written by hand (as another tool would), ``records`` {str key: bytes}."""
    env = lmdb.open(str(path), map_size=1 << 24, subdir=subdir, lock=False)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key.encode(), value)
    env.close()
    return path


def _encoded(rgb: np.ndarray, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- LMDB round trips


@pytest.mark.parametrize("fmt,lossless", [("png", False), ("webp", True)])
def test_lmdb_round_trip_lossless_is_pixel_identical(tmp_path, fmt, lossless):
    src = _noise_images(tmp_path / "src")
    out = tmp_path / "data.lmdb"
    report = build_lmdb(src, out, 16, image_format=fmt, lossless=lossless, progress=False)
    assert report.count == N and report.key_format == "16-{index:05d}"
    assert sorted(p.name for p in out.iterdir()) == ["data.mdb"]

    ds = LMDBDataset(out, 16)
    folder = ImageFolderDataset(src, 16)
    assert len(ds) == N and ds.key_format == "16-{index:05d}" and ds.item_names == folder.item_names
    assert torch.equal(_images(ds), _images(folder))
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16) and label.shape == (0,)
    assert torch.equal(ds[-1][0], ds[N - 1][0])
    # two datasets over one LMDB in one process (train and eval sets) share its environment
    assert torch.equal(LMDBDataset(out, 16)[3][0], ds[3][0])
    # the raw layout, as DiffAE's BaseLMDB reads it (LMDB allows one environment per process)
    close_envs()
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"length") == b"8"
        assert txn.get(b"16-00000") is not None and txn.get(b"16-00007") is not None
        assert txn.get(b"16-00008") is None
        expected = np.asarray(Image.open(src / "img0.png").convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(txn.get(b"16-00000"))).convert("RGB")), expected)
    env.close()


def test_lmdb_round_trip_jpeg_within_tolerance(tmp_path):
    src = _smooth_images(tmp_path / "src")
    out = tmp_path / "jpeg.lmdb"
    build_lmdb(src, out, 16, image_format="jpeg", quality=95, progress=False)
    diff = (_images(LMDBDataset(out, 16)) - _images(ImageFolderDataset(src, 16))).abs()
    assert diff.mean() < 2 / 127.5 and diff.max() < 12 / 127.5  # within a few of 255 levels
    assert Image.open(io.BytesIO(LMDBDataset(out, 16).read_bytes(0))).format == "JPEG"


def test_converter_centre_crops_and_resizes_like_the_folder_dataset(tmp_path):
    src = _noise_images(tmp_path / "src", n=3, size=(40, 30))
    out = tmp_path / "small.lmdb"
    build_lmdb(src, out, 12, image_format="png", progress=False)
    ds = LMDBDataset(out, 12)
    assert torch.equal(_images(ds), _images(ImageFolderDataset(src, 12)))
    # stored at 12; read at 8 it is resized again, like the folder dataset at 8 from 12 px files
    assert LMDBDataset(out, 8)[0][0].shape == (3, 8, 8)


def test_converter_reads_zip_sources_and_parallel_workers_match(tmp_path):
    src = _noise_images(tmp_path / "src", n=5)
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.iterdir()):
            zf.write(p, f"faces/{p.name}")
    build_lmdb(src, tmp_path / "a.lmdb", 16, image_format="png", progress=False)
    build_lmdb(archive, tmp_path / "b.lmdb", 16, image_format="png", progress=False, workers=2)
    a, b = LMDBDataset(tmp_path / "a.lmdb", 16), LMDBDataset(tmp_path / "b.lmdb", 16)
    assert torch.equal(_images(a), _images(b))
    assert b.item_names == [f"faces/img{i}.png" for i in range(5)]


# ---------------------------------------------------------------- layouts written by other tools


def test_reads_the_official_dbae_celeba_layout_none_zfill7(tmp_path):
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (16, 16, 3), np.uint8) for _ in range(3)]
    records = {f"None-{i:07d}": _encoded(p) for i, p in enumerate(pixels)}
    path = _write_raw_lmdb(tmp_path / "celeba.lmdb", {**records, "length": b"3"})
    ds = LMDBDataset(path, 16)
    assert ds.key_format == "None-{index:07d}" and len(ds) == 3 and ds.item_names is None
    for i, p in enumerate(pixels):
        assert torch.equal(ds[i][0], torch.from_numpy(p).permute(2, 0, 1).float() / 127.5 - 1)


def test_reads_a_diffae_jpeg_lmdb_with_several_resolutions(tmp_path):
    rng = np.random.default_rng(2)
    records = {"length": b"2"}
    for i in range(2):
        for size in (8, 32, 64):
            records[f"{size}-{i:05d}"] = _encoded(rng.integers(0, 256, (size, size, 3), np.uint8), "JPEG")
    path = _write_raw_lmdb(tmp_path / "ffhq", records)  # no .lmdb suffix: a dir holding data.mdb
    assert dataset_kind(str(path)) == "lmdb"
    assert LMDBDataset(path, 32).key_format == "32-{index:05d}"  # the requested size
    assert LMDBDataset(path, 16).key_format == "32-{index:05d}"  # else the smallest larger one
    assert LMDBDataset(path, 128).key_format == "64-{index:05d}"  # else the largest
    assert LMDBDataset(path, 16, key_format="8-{index:05d}").key_format == "8-{index:05d}"
    assert LMDBDataset(path, 16)[1][0].shape == (3, 16, 16)


def test_reads_a_single_file_lmdb(tmp_path):
    path = _write_raw_lmdb(tmp_path / "one.lmdb", {"length": b"1", "4-00000": _encoded(np.zeros((4, 4, 3), np.uint8))},
                           subdir=False)
    image, _ = build_dataset(str(path), 4)[0]
    assert torch.equal(image, -torch.ones(3, 4, 4))


# ---------------------------------------------------------------- clear errors


def test_missing_or_bad_length_key_names_the_key(tmp_path):
    image = _encoded(np.zeros((4, 4, 3), np.uint8))
    path = _write_raw_lmdb(tmp_path / "nolen.lmdb", {"4-00000": image})
    with pytest.raises(DataError, match=r"nolen\.lmdb: no 'length' key"):
        LMDBDataset(path, 4)
    path = _write_raw_lmdb(tmp_path / "badlen.lmdb", {"4-00000": image, "length": b"lots"})
    with pytest.raises(DataError, match=r"badlen\.lmdb: the 'length' key holds b'lots'"):
        LMDBDataset(path, 4)


def test_missing_and_bad_records_name_the_key(tmp_path):
    good = _encoded(np.zeros((4, 4, 3), np.uint8))
    # length says 3, but record 2 was never written
    path = _write_raw_lmdb(tmp_path / "short.lmdb", {"length": b"3", "4-00000": good, "4-00001": good})
    with pytest.raises(DataError, match=r"short\.lmdb: key '4-00002' is missing.*says 3 images"):
        LMDBDataset(path, 4)
    # a hole in the middle shows on access
    path = _write_raw_lmdb(tmp_path / "hole.lmdb", {"length": b"3", "4-00000": good, "4-00002": good})
    ds = LMDBDataset(path, 4)
    with pytest.raises(DataError, match=r"key '4-00001' is missing"):
        ds[1]
    # a record that is not an image
    path = _write_raw_lmdb(tmp_path / "junk.lmdb", {"length": b"2", "4-00000": good, "4-00001": b"\x00junk"})
    ds = LMDBDataset(path, 4)
    ds[0]
    with pytest.raises(DataError, match=r"junk\.lmdb: record '4-00001': not a readable image"):
        ds[1]
    with pytest.raises(IndexError):
        ds[2]


def test_lmdb_open_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such LMDB"):
        LMDBDataset(tmp_path / "missing.lmdb", 16)
    (tmp_path / "junk.lmdb").write_bytes(np.random.default_rng(0).bytes(9000))
    with pytest.raises(DataError, match=r"junk\.lmdb: cannot open the LMDB"):
        LMDBDataset(tmp_path / "junk.lmdb", 16)
    (tmp_path / "empty.lmdb").mkdir()
    with pytest.raises(DataError, match="without data.mdb"):
        LMDBDataset(tmp_path / "empty.lmdb", 16)
    path = _write_raw_lmdb(tmp_path / "nokeys.lmdb", {"length": b"2"})
    with pytest.raises(DataError, match="no image keys like '128-00000'"):
        LMDBDataset(path, 16)
    monkeypatch.setitem(sys.modules, "lmdb", None)  # as if it were not installed
    with pytest.raises(DataError, match="pip install lmdb"):
        LMDBDataset(tmp_path / "any.lmdb", 16)
    with pytest.raises(DataError, match="pip install lmdb"):
        build_lmdb(_noise_images(tmp_path / "src", n=1), tmp_path / "new.lmdb", 16, progress=False)


# ---------------------------------------------------------------- workers


@pytest.mark.parametrize("kind", ["lmdb", "zip"])
def test_datasets_work_with_forked_dataloader_workers_and_pickle(tmp_path, kind):
    src = _noise_images(tmp_path / "src")
    if kind == "lmdb":
        spec = tmp_path / "d.lmdb"
        build_lmdb(src, spec, 16, image_format="png", progress=False)
    else:
        spec = tmp_path / "d.zip"
        with zipfile.ZipFile(spec, "w") as zf:
            for p in sorted(src.iterdir()):
                zf.write(p, p.name)
    ds = build_dataset(str(spec), 16)
    expected = _images(ds)  # the handle is now open in this (parent) process
    loader = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="fork")
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, expected)
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives: no handle
    assert torch.equal(_images(clone), expected)


# ---------------------------------------------------------------- zip files


def test_zip_dataset_sorted_members_match_the_folder(tmp_path):
    src = _noise_images(tmp_path / "src", n=4, size=(20, 24))
    archive = tmp_path / "imgs.ZIP"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.iterdir(), reverse=True):
            zf.write(p, f"sub/{p.name}")
        zf.writestr("readme.txt", "not an image")
        zf.writestr("__MACOSX/sub/._img0.png", b"resource fork")
    ds = build_dataset(str(archive), 16)
    assert isinstance(ds, ZipImageDataset)
    assert ds.item_names == [f"sub/img{i}.png" for i in range(4)]
    assert torch.equal(_images(ds), _images(ImageFolderDataset(src, 16)))


def test_zip_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        ZipImageDataset(tmp_path / "missing.zip", 16)
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"junk\.zip: not a readable zip file"):
        ZipImageDataset(tmp_path / "junk.zip", 16)
    with zipfile.ZipFile(tmp_path / "text.zip", "w") as zf:
        zf.writestr("a.txt", "x")
    with pytest.raises(DataError, match="no images found in the zip file"):
        ZipImageDataset(tmp_path / "text.zip", 16)
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("a.png", b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"bad\.zip: member 'a\.png': not a readable image"):
        ZipImageDataset(tmp_path / "bad.zip", 16)[0]


# ---------------------------------------------------------------- dispatch


def test_build_dataset_dispatch(tmp_path):
    src = _noise_images(tmp_path / "src", n=2)
    build_lmdb(src, tmp_path / "x.lmdb", 8, progress=False)
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        zf.write(src / "img0.png", "img0.png")
    assert isinstance(build_dataset("shapes", 8), ShapesDataset)
    assert isinstance(build_dataset(str(tmp_path / "x.lmdb"), 8), LMDBDataset)
    assert isinstance(build_dataset(str(tmp_path / "x.zip"), 8), ZipImageDataset)
    assert isinstance(build_dataset(str(src), 8), ImageFolderDataset)
    assert [dataset_kind(s) for s in ("shapes", "a.lmdb", "b.zip", "c")] == ["shapes", "lmdb", "zip", "folder"]


# ---------------------------------------------------------------- attribute files


def _attr_file(path, files, values, names=("Smiling", "Young", "Male")):
    rows = [f"{f} " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, values)]
    path.write_text(f"{len(files)}\n{' '.join(names)}\n" + "\n".join(rows) + "\n")
    return path


def test_celeba_attribute_parser(tmp_path):
    values = [[1, -1, 1], [-1, -1, 1], [1, 1, -1]]
    attr = _attr_file(tmp_path / "list_attr_celeba.txt", ["000001.jpg", "000002.jpg", "000003.jpg"], values)
    names, mapping = read_celeba_attributes(attr)
    assert names == ("Smiling", "Young", "Male")
    assert set(mapping) == {"000001.jpg", "000002.jpg", "000003.jpg"}
    assert mapping["000003.jpg"].dtype == torch.float32
    assert mapping["000003.jpg"].tolist() == [1.0, 1.0, 0.0] and mapping["000002.jpg"].tolist() == [0.0, 0.0, 1.0]
    (tmp_path / "bad.txt").write_text("2\nA B\nx.jpg 1 1\ny.jpg 1 3\n")
    with pytest.raises(DataError, match=r"bad\.txt:4: attribute values must be -1/1"):
        read_attribute_table(tmp_path / "bad.txt")


def test_attribute_labels_for_folder_zip_and_lmdb(tmp_path):
    src = _smooth_images(tmp_path / "src", n=4)  # 000000.png .. 000003.png
    rng = np.random.default_rng(3)
    values = rng.choice([-1, 1], size=(6, 3)).tolist()
    # CelebA names the files .jpg and lists more images than the folder holds, in another order
    files = [f"{i:06d}.jpg" for i in (5, 3, 2, 1, 0, 4)]
    attr = _attr_file(tmp_path / "attr.txt", files, values)
    expected = torch.tensor([[1.0 if v == 1 else 0.0 for v in values[files.index(f"{i:06d}.jpg")]]
                             for i in range(4)])

    build_lmdb(src, tmp_path / "a.lmdb", 16, image_format="png", progress=False)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        for p in sorted(src.iterdir()):
            zf.write(p, f"img_align_celeba/{p.name}")
    for spec in (src, tmp_path / "a.lmdb", tmp_path / "a.zip"):
        ds = build_dataset(str(spec), 16, attributes=attr)
        assert isinstance(ds, AttributeDataset) and ds.names == ("Smiling", "Young", "Male")
        labels = torch.stack([ds[i][1] for i in range(len(ds))])
        assert labels.dtype == torch.float32 and torch.equal(labels, expected), spec
        assert torch.equal(ds[2][0], ImageFolderDataset(src, 16)[2][0])
        batch = next(iter(DataLoader(ds, batch_size=4)))
        assert batch[1].shape == (4, 3)


def test_attribute_matching_by_position_and_errors(tmp_path):
    good = _encoded(np.zeros((4, 4, 3), np.uint8))
    path = _write_raw_lmdb(tmp_path / "hq.lmdb", {"length": b"2", "4-00000": good, "4-00001": good})
    attr = _attr_file(tmp_path / "attr.txt", ["0.jpg", "1.jpg"], [[1, 1, 1], [-1, -1, 1]])
    ds = build_dataset(str(path), 4, attributes=attr)  # no stored names: row i is item i
    assert ds[1][1].tolist() == [0.0, 0.0, 1.0]
    three = _attr_file(tmp_path / "three.txt", ["0.jpg", "1.jpg", "2.jpg"], [[1, 1, 1]] * 3)
    with pytest.raises(DataError, match="does not store image names.*2 images.*3 rows"):
        build_dataset(str(path), 4, attributes=three)

    src = _noise_images(tmp_path / "src", n=3)  # img0.png .. img2.png
    partial = _attr_file(tmp_path / "partial.txt", ["img0.png", "img2.png"], [[1, 1, 1]] * 2)
    with pytest.raises(DataError, match=r"1 image\(s\) of .*src have no row in .*partial\.txt: img1\.png"):
        build_dataset(str(src), 16, attributes=partial)
    with pytest.raises(DataError, match="shapes dataset carries its own factors"):
        build_dataset("shapes", 16, attributes=partial)


# ---------------------------------------------------------------- dbae data build-lmdb


def test_cli_build_lmdb_then_overwrite_rules(capsys, tmp_path):
    src = _noise_images(tmp_path / "src")
    out = tmp_path / "out" / "faces.lmdb"
    code, stdout, err = run_cli(capsys, "data", "build-lmdb", str(src), str(out), "--size", "16", "--format", "png")
    assert code == 0, err
    assert "8 images of 16x16" in stdout and "16-00000 .. 16-00007" in stdout
    assert "8/8" in err  # the progress bar
    assert torch.equal(_images(LMDBDataset(out, 16)), _images(ImageFolderDataset(src, 16)))

    code, _, err = run_cli(capsys, "data", "build-lmdb", str(src), str(out), "--size", "16", "--no-progress")
    assert code == 2 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "data", "build-lmdb", str(src), str(out), "--size", "8", "--overwrite",
                           "--no-progress", "--key-format", "None-{index:07d}")
    assert code == 0 and err == ""
    ds = LMDBDataset(out, 8)
    assert len(ds) == 8 and ds.key_format == "None-{index:07d}" and ds[0][0].shape == (3, 8, 8)
    assert sorted(p.name for p in out.parent.iterdir()) == ["faces.lmdb"]  # no temporary left over

    # --overwrite never deletes something that is not an LMDB
    code, _, err = run_cli(capsys, "data", "build-lmdb", str(src), str(tmp_path / "src"), "--size", "8",
                           "--overwrite", "--no-progress")
    assert code == 2 and "is not an LMDB" in err and len(list(src.iterdir())) == N


def test_cli_build_lmdb_overwrite_never_replaces_a_plain_file(capsys, tmp_path):
    src = _noise_images(tmp_path / "src", n=2)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, _, err = run_cli(capsys, "data", "build-lmdb", str(src), str(notes), "--size", "8", "--overwrite",
                           "--no-progress")
    assert code == 2 and "is not an LMDB" in err and "Traceback" not in err
    assert notes.read_text() == "my notes\n"
    # an output under a file: one line, not a traceback
    code, _, err = run_cli(capsys, "data", "build-lmdb", str(src), str(notes / "o.lmdb"), "--size", "8",
                           "--no-progress")
    assert code == 2 and f"{notes} is a file, not a folder" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"]
    # a one-file LMDB (lmdb's subdir=False layout) is still replaced
    lmdb = pytest.importorskip("lmdb")
    single = tmp_path / "single.mdb"
    env = lmdb.open(str(single), subdir=False, lock=False)
    env.close()
    code, _, err = run_cli(capsys, "data", "build-lmdb", str(src), str(single), "--size", "8", "--overwrite",
                           "--no-progress")
    assert code == 0, err
    assert len(LMDBDataset(single, 8)) == 2


def test_cli_build_lmdb_errors_are_one_line_and_leave_nothing(capsys, tmp_path):
    out = tmp_path / "o.lmdb"
    cases = [
        ([str(tmp_path / "missing"), str(out), "--size", "16"], "no such directory"),
        ([str(tmp_path), str(out), "--size", "16"], "no images found"),
        ([str(tmp_path), str(out), "--size", "0"], "--size"),
        ([str(tmp_path), str(out), "--size", "16", "--lossless"], "JPEG cannot be lossless"),
        ([str(tmp_path), str(out), "--size", "16", "--key-format", "{index}"], "keys must look like '128-00000'"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, "data", "build-lmdb", *argv, "--no-progress")
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1
    # a corrupt source image, found half-way: the error names it and no OUT (or temporary) is left
    src = _noise_images(tmp_path / "src", n=4)
    (src / "img2.png").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "data", "build-lmdb", str(src), str(out), "--size", "16", "--no-progress")
    assert code == 2 and "img2.png" in err and "not a readable image" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_build_lmdb_help_describes_the_layout(capsys):
    with pytest.raises(SystemExit):
        main(["data", "build-lmdb", "--help"])
    text = capsys.readouterr().out
    assert "'{size}-{index:05d}'" in text and "'length'" in text and "--overwrite" in text and "pip install lmdb" in text
