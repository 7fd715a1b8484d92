"""Oxford-IIIT Pet from miniature official archives: list files, odd images, skips."""

import miniatures
import numpy as np
import pytest
from test_archives import serve

from vitpipe.data.sources import SkipImage, get_source
from vitpipe.errors import ParamError, UserError
from vitpipe.params import DataParams


def cfg(**kw):
    kw.setdefault("md5", None)
    return DataParams(dataset="pets", **kw)


@pytest.fixture(scope="module")
def pets_archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pets_download")
    miniatures.make_pets(folder)
    return folder


def test_import_extracts_what_is_needed(pets_archives, tmp_path):
    raw = tmp_path / "data/raw/pets"
    get_source("pets").fetch(cfg(archive=str(pets_archives)), raw)
    assert sorted(p.name for p in raw.iterdir()) == ["annotations", "images"]
    assert sorted(p.name for p in (raw / "annotations").iterdir()) == ["list.txt", "test.txt", "trainval.txt"]
    assert len(list((raw / "images").glob("*.jpg"))) == 9 and not list((raw / "images").glob("*.mat"))
    assert not (tmp_path / "data/downloads").exists()  # a local import is extracted from where it is


def test_official_split_classes_and_awkward_images(pets_archives, tmp_path):
    raw = tmp_path / "raw"
    src = get_source("pets")
    src.fetch(cfg(archive=str(pets_archives)), raw)
    ds = src.open(cfg(), raw)
    assert ds.classes == miniatures.PETS_CLASSES
    train, test = ds.splits["train"], ds.splits["test"]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and test.labels.tolist() == [0, 1, 2]
    decoded, skipped = [], 0
    for i in range(len(train)):
        try:
            decoded.append(train.image(i))
        except SkipImage:
            skipped += 1
    assert skipped == 2  # the truncated JPEG and the file that is no image
    for img in decoded:  # RGB, RGBA-PNG, grayscale and palette all come back as HxWx3 uint8
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    gray = train.image(2)
    assert gray.shape == (14, 20, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    assert test.image(1).shape == (14, 20, 3)  # CMYK
    assert test.image(2).shape == (50, 8, 3)  # any size


def test_md5_default_checks_each_archive(pets_archives, tmp_path):
    with pytest.raises(UserError, match="images.tar.gz: md5 .* expected 5c4f3ee8e5d25df40f4fd59a7f44e54c"):
        get_source("pets").fetch(cfg(archive=str(pets_archives), md5="default"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    with pytest.raises(ParamError, match="data.md5"):
        get_source("pets").fetch(cfg(archive=str(pets_archives), md5="a" * 32), tmp_path / "raw")


def test_archive_must_be_a_folder_with_both_files(pets_archives, tmp_path):
    with pytest.raises(UserError, match="must be a folder"):
        get_source("pets").fetch(cfg(archive=str(pets_archives / "images.tar.gz")), tmp_path / "raw")
    half = tmp_path / "half"
    half.mkdir()
    (half / "images.tar.gz").write_bytes((pets_archives / "images.tar.gz").read_bytes())
    with pytest.raises(UserError, match="has no annotations.tar.gz"):
        get_source("pets").fetch(cfg(archive=str(half)), tmp_path / "raw")


def test_download_into_cache_and_offline_message(pets_archives, tmp_path):
    raw = tmp_path / "data/raw/pets"
    with serve(pets_archives) as base:
        get_source("pets").fetch(cfg(url=base), raw)
    assert sorted(p.name for p in (tmp_path / "data/downloads").iterdir()) == ["annotations.tar.gz", "images.tar.gz"]
    assert len(get_source("pets").open(cfg(), raw).splits["test"]) == 3

    with pytest.raises(UserError) as e:
        get_source("pets").fetch(cfg(url="http://127.0.0.1:9/"), tmp_path / "offline/raw/pets")
    msg = str(e.value)
    for needed in (
        "https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz",
        "https://thor.robots.ox.ac.uk/~vgg/data/pets/annotations.tar.gz",
        "data.archive",
        "images.tar.gz and annotations.tar.gz",
        "data.dataset: digits",
    ):
        assert needed in msg


def test_end_to_end_through_prepare_counts_skips(pets_archives, tmp_path, monkeypatch):
    from vitpipe.data.prepare import prepare

    monkeypatch.chdir(tmp_path)
    c = cfg(archive=str(pets_archives), image_size=16, workers=1, split={"train": 0.5, "val": 0.5, "test": 0.0})
    get_source("pets").fetch(c, c.raw_dir)
    meta = prepare(c)
    assert meta["classes"] == miniatures.PETS_CLASSES and meta["num_classes"] == 3
    assert meta["skipped"]["test"] == 0 and meta["skipped"]["train"] + meta["skipped"]["val"] == 2
    assert meta["skipped_total"] == 2
    assert meta["sizes"]["test"] == 3 and meta["sizes"]["train"] + meta["sizes"]["val"] == 4
    x = np.load(tmp_path / "data/prepared/pets/test_x.npy")
    assert x.shape == (3, 16, 16, 3) and x.dtype == np.uint8
    assert np.load(tmp_path / "data/prepared/pets/test_y.npy").tolist() == [0, 1, 2]


# ---------------------------------------------------------------- bad data


def test_damaged_images_archive_is_one_line_and_nothing_lands(pets_archives, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "annotations.tar.gz").write_bytes((pets_archives / "annotations.tar.gz").read_bytes())
    data = (pets_archives / "images.tar.gz").read_bytes()
    (folder / "images.tar.gz").write_bytes(data[: len(data) // 2])
    raw = tmp_path / "data/raw/pets"
    raw.mkdir(parents=True)
    (raw / "kept.txt").write_text("an earlier extraction")
    with pytest.raises(UserError) as e:
        get_source("pets").fetch(cfg(archive=str(folder)), raw)
    assert str(e.value).startswith(f"{folder / 'images.tar.gz'} is damaged (truncated or corrupt: ")
    assert [p.name for p in (tmp_path / "data/raw").iterdir()] == ["pets"]
    assert [p.name for p in raw.iterdir()] == ["kept.txt"]


def test_images_that_do_not_decode_fail_the_download_stage(tmp_path):
    folder = tmp_path / "downloads"
    junk = {
        name: b"<html>404 Not Found</html>"
        for name in (
            "Abyssinian_1",
            "Abyssinian_2",
            "Abyssinian_3",
            "american_bulldog_10",
            "american_bulldog_11",
            "american_bulldog_12",
            "Bengal_5",
            "Bengal_6",
            "Bengal_7",
        )
    }
    miniatures.make_pets(folder, replace=junk)
    with pytest.raises(UserError) as e:
        get_source("pets").fetch(cfg(archive=str(folder)), tmp_path / "raw")
    assert str(e.value) == (
        f"{folder / 'images.tar.gz'}: none of the 9 image files could be decoded (e.g. "
        f"images/Abyssinian_1.jpg: not an image, or a format PIL cannot read); they are damaged "
        f"or not images: download https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz again"
    )
    assert not (tmp_path / "raw").exists()


def test_breed_with_no_readable_training_image_fails_preprocess(tmp_path, monkeypatch):
    from vitpipe.data.prepare import prepare

    folder = tmp_path / "downloads"
    miniatures.make_pets(folder, replace={"Bengal_5": b"GIF89a truncated"})  # Bengal_6 is no image either
    monkeypatch.chdir(tmp_path)
    c = cfg(archive=str(folder), image_size=16, workers=1, split={"train": 1.0, "val": 0.0, "test": 0.0})
    get_source("pets").fetch(c, c.raw_dir)
    with pytest.raises(
        UserError,
        match=r"^data/raw/pets: class 'Bengal' has no readable image in the train split "
        r"\('Bengal' has 2 image\(s\) there and none decodes, e\.g\. "
        r"data/raw/pets/images/Bengal_5\.jpg: ",
    ):
        prepare(c)
    assert not (tmp_path / "data/prepared").exists() or list((tmp_path / "data/prepared").iterdir()) == []
