"""A user's folder (or tar/zip) of class sub-folders."""

import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

import miniatures
from vitpipe.data.imagefolder import decode_image
from vitpipe.data.sources import SkipImage, get_source
from vitpipe.errors import UserError
from vitpipe.params import DataParams


def cfg(**kw):
    kw.setdefault("md5", None)
    return DataParams(dataset="imagefolder", **kw)


def user_folder(root):
    for cls, n in (("dogs", 2), ("cats", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{i}.jpg").write_bytes(miniatures.image_bytes("RGB", seed=i))
    (root / "cats/nested").mkdir()
    (root / "cats/nested/deep.png").write_bytes(miniatures.image_bytes("LA", fmt="PNG"))
    (root / "cats/notes.txt").write_text("not an image")
    (root / "cats/.DS_Store").write_bytes(b"\0")
    (root / "dogs/._0.jpg").write_bytes(b"AppleDouble")
    (root / "empty").mkdir()
    (root / "README.md").write_text("top-level files are not classes")
    return root


def test_folder_is_copied_and_read(tmp_path):
    src = user_folder(tmp_path / "mine")
    raw = tmp_path / "raw"
    source = get_source("imagefolder")
    source.fetch(cfg(archive=str(src)), raw)
    ds = source.open(cfg(), raw)
    assert ds.classes == ["cats", "dogs"] and set(ds.splits) == {"train"}
    images = ds.splits["train"]
    assert images.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert all(images.image(i).shape == (14, 20, 3) for i in range(len(images)))
    assert not (raw / "cats/notes.txt").exists()
    assert len(pickle.dumps(images)) < 5_000


def test_zip_with_a_wrapping_folder(tmp_path):
    archive = tmp_path / "flowers.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for cls in ("rose", "daisy"):
            for i in range(2):
                zf.writestr(f"flowers/{cls}/{i}.png", miniatures.image_bytes("RGB", fmt="PNG", seed=i))
        zf.writestr("__MACOSX/flowers/rose/._0.png", b"junk")
    source = get_source("imagefolder")
    source.fetch(cfg(archive=str(archive)), tmp_path / "raw")
    ds = source.open(cfg(), tmp_path / "raw")
    assert ds.classes == ["daisy", "rose"] and len(ds.splits["train"]) == 4


def test_tar_is_extracted_safely(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("a/0.jpg", "b/0.jpg", "../escape.jpg"):
            data = miniatures.image_bytes("RGB")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="refusing to extract.*`..`"):
        get_source("imagefolder").fetch(cfg(archive=str(archive)), tmp_path / "raw")
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "raw").exists()


def test_user_errors(tmp_path):
    source = get_source("imagefolder")
    with pytest.raises(UserError, match="needs `data.archive`.*data.dataset: digits"):
        source.fetch(cfg(), tmp_path / "raw")
    one = tmp_path / "one/only"
    one.mkdir(parents=True)
    (one / "x.jpg").write_bytes(miniatures.image_bytes("RGB"))
    with pytest.raises(UserError, match="at least two"):
        source.fetch(cfg(archive=str(tmp_path / "one")), tmp_path / "raw")
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/0.jpg", b"x")
        zf.writestr("b/0.jpg", b"y")
    with pytest.raises(UserError, match="md5"):
        source.fetch(cfg(archive=str(archive), md5="0" * 32), tmp_path / "raw2")
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(UserError, match="neither a folder nor"):
        source.fetch(cfg(archive=str(tmp_path / "plain.txt")), tmp_path / "raw3")


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"),
                                      ("1", "PNG"), ("LA", "PNG"), ("RGB", "WEBP")])
def test_decode_any_mode_to_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(miniatures.image_bytes(mode, fmt=fmt))
    img = decode_image(path)
    assert img.shape == (14, 20, 3) and img.dtype == np.uint8


def test_decode_16bit_and_palette_transparency(tmp_path):
    wide = np.arange(14 * 20, dtype=np.uint16).reshape(14, 20) * 200
    Image.fromarray(wide).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    img = decode_image(tmp_path / "deep.png")
    assert np.array_equal(img[..., 1], (wide >> 8).astype(np.uint8))
    pal = Image.new("P", (5, 4))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert decode_image(tmp_path / "pal.png").shape == (4, 5, 3)


def test_truncated_and_garbage_are_skipped(tmp_path):
    good = miniatures.image_bytes("RGB", size=(64, 64))
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])
    (tmp_path / "junk.jpg").write_bytes(b"\x00" * 100)
    for name in ("cut.jpg", "junk.jpg", "missing.jpg"):
        with pytest.raises(SkipImage):
            decode_image(tmp_path / name)
