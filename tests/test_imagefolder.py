"""A user's folder (or tar/zip) of class sub-folders."""

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import miniatures
import numpy as np
import pytest
from PIL import Image

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


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGBA", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("1", "PNG"), ("LA", "PNG"), ("RGB", "WEBP")],
)
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


# ---------------------------------------------------------------- bad data


def classes_folder(root, counts: dict, bad: dict | None = None):
    """root/<class>/<i>.jpg: counts[class] good images, then bad[class] files that are no images."""
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"{i:03d}.jpg").write_bytes(miniatures.image_bytes("RGB", size=(8, 8), seed=i))
    for cls, n in (bad or {}).items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"bad_{i}.jpg").write_bytes(b"\x00" * 50)
    return root


def prepared_cfg(src, **kw):
    kw.setdefault("split", {"train": 0.5, "val": 0.0, "test": 0.5})
    return cfg(archive=str(src), image_size=8, workers=1, **kw)


@pytest.mark.parametrize("packed", [False, True])
def test_nothing_decodes_is_one_line_and_nothing_lands(tmp_path, packed):
    src = classes_folder(tmp_path / "mine", {}, bad={"cats": 2, "dogs": 1})
    if packed:
        archive = tmp_path / "mine.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(src.rglob("*.jpg")):
                zf.writestr(f"mine/{p.relative_to(src).as_posix()}", p.read_bytes())
        src = archive
    raw = tmp_path / "data/raw/imagefolder"
    with pytest.raises(UserError) as e:
        get_source("imagefolder").fetch(cfg(archive=str(src)), raw)
    assert str(e.value) == (
        f"data.archive: {src}: none of the 3 image files could be decoded (e.g. cats/bad_0.jpg: "
        f"not an image, or a format PIL cannot read); they are damaged or not images: put "
        f"readable image files (JPEG, PNG, …) in the class sub-folders"
    )
    assert list((tmp_path / "data/raw").iterdir()) == []  # no temp folder, no half copy


def test_class_with_no_readable_image_fails_preprocess_and_keeps_the_store(tmp_path, monkeypatch):
    from vitpipe.data.prepare import prepare

    monkeypatch.chdir(tmp_path)
    good = classes_folder(tmp_path / "good", {"cats": 4, "dogs": 4, "birds": 4})
    c = prepared_cfg(good)
    get_source("imagefolder").fetch(c, c.raw_dir)
    prepare(c)
    store = tmp_path / "data/prepared/imagefolder"
    before = {p.name: p.read_bytes() for p in store.iterdir()}

    broken = classes_folder(tmp_path / "broken", {"cats": 4, "dogs": 4}, bad={"birds": 4})
    c = prepared_cfg(broken)
    get_source("imagefolder").fetch(c, c.raw_dir)  # some images decode: the download stage passes
    with pytest.raises(UserError) as e:
        prepare(c)
    assert str(e.value) == (
        "data/raw/imagefolder: class 'birds' has no readable image in the train split "
        "('birds' has 2 image(s) there and none decodes, e.g. data/raw/imagefolder/birds/bad_0.jpg: not an image, "
        "or a format PIL cannot read); every class needs readable images in both train and test: "
        "add some to it or remove the class, then run `dvc repro` again"
    )
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before  # the earlier store, byte for byte
    assert sorted(p.name for p in store.parent.iterdir()) == ["imagefolder"]  # no temp folder


def test_class_too_small_for_the_split_fails_before_decoding(tmp_path, monkeypatch):
    from vitpipe.data import prepare

    monkeypatch.chdir(tmp_path)
    src = classes_folder(tmp_path / "mine", {"cats": 5, "dogs": 5, "birds": 1})
    c = prepared_cfg(src, split={"train": 0.7, "val": 0.1, "test": 0.2})
    get_source("imagefolder").fetch(c, c.raw_dir)
    monkeypatch.setattr(prepare, "write_split", None)  # must not be reached
    with pytest.raises(
        UserError,
        match=r"^data/raw/imagefolder: class 'birds' has no readable image in the test "
        r"split \('birds' has 1 image\(s\) in all, none of them in the test split\)",
    ):
        prepare.prepare(c)


def test_thin_class_is_warned_and_recorded(tmp_path, monkeypatch, capsys):
    from vitpipe.data.prepare import prepare, sanity_metrics

    monkeypatch.chdir(tmp_path)
    src = classes_folder(tmp_path / "mine", {"cats": 40, "dogs": 40, "birds": 2})
    c = prepared_cfg(src)
    get_source("imagefolder").fetch(c, c.raw_dir)
    meta = prepare(c)
    assert meta["thin_classes"] == ["birds"]
    assert meta["class_counts"]["train"][0] == 1 and meta["class_counts"]["test"][0] == 1  # birds sort first
    line = (
        "data/raw/imagefolder: 1 class(es) with under 10% of the median 20 train images per class: 'birds' (1); "
        "the model barely learns them and their accuracy is noise: add images to them or remove them"
    )
    assert line in meta["warnings"]
    assert f"vitpipe: warning: {line}\n" in capsys.readouterr().err
    assert sanity_metrics(meta) == {"thin_classes": 1, "thin_class_names": "birds", "data_warnings": 2}  # train, test


@pytest.mark.parametrize("packed", [False, True])
def test_folder_without_image_files_is_warned_not_dropped_silently(tmp_path, monkeypatch, capsys, packed):
    from vitpipe.data.prepare import prepare

    monkeypatch.chdir(tmp_path)
    src = classes_folder(tmp_path / "flowers", {"rose": 4, "tulip": 4})
    (src / "daisy").mkdir()
    for i in range(3):
        (src / "daisy" / f"IMG_{i}.heic").write_bytes(b"ftypheic")
    (src / "daisy/notes.txt").write_text("phone photos")
    if packed:
        archive = tmp_path / "flowers.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(src, arcname="flowers")
        src = archive
    c = prepared_cfg(src)
    get_source("imagefolder").fetch(c, c.raw_dir)
    line = (
        "sub-folder 'daisy' holds no image files (3 .heic, 1 .txt), so it is not a class and is left out: "
        "convert its images to JPEG or PNG, or move it out of the folder"
    )
    assert f"vitpipe: warning: data.archive: {src}: {line}\n" in capsys.readouterr().err
    meta = prepare(c)
    assert meta["classes"] == ["rose", "tulip"]
    assert meta["warnings"] == [f"data/raw/imagefolder: {line}"]
    assert f"vitpipe: warning: data/raw/imagefolder: {line}\n" in capsys.readouterr().err


def test_truncated_zip_of_images(tmp_path):
    archive = tmp_path / "mine.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for cls in ("a", "b"):
            zf.writestr(f"{cls}/0.png", miniatures.image_bytes("RGB", fmt="PNG"))
    archive.write_bytes(archive.read_bytes()[:-30])
    with pytest.raises(UserError, match=r"mine.zip is damaged \(truncated or corrupt: the zip directory"):
        get_source("imagefolder").fetch(cfg(archive=str(archive)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mine.zip"]


def test_raw_images_spoiled_after_download_fail_preprocess_in_one_line(tmp_path, monkeypatch):
    from vitpipe.data.prepare import prepare

    monkeypatch.chdir(tmp_path)
    c = prepared_cfg(classes_folder(tmp_path / "mine", {"cats": 2, "dogs": 2}))
    get_source("imagefolder").fetch(c, c.raw_dir)
    for p in Path(c.raw_dir).rglob("*.jpg"):
        p.write_bytes(b"")
    with pytest.raises(UserError) as e:
        prepare(c)
    assert str(e.value) == (
        "data/raw/imagefolder: none of the 4 image files could be decoded (e.g. "
        "data/raw/imagefolder/cats/000.jpg: not an image, or a format PIL cannot read); they are "
        "damaged or not images: run `dvc repro download` again to restore them"
    )
