"""CIFAR-10/100 from miniature archives in the official layout and pickle format."""

import hashlib
import io
import os
import pickle

import miniatures
import numpy as np
import pytest
from test_archives import closed_port_url, serve

from vitpipe.data import cifar
from vitpipe.data.sources import get_source
from vitpipe.errors import UserError
from vitpipe.params import DataParams


def cfg(**kw):
    kw.setdefault("md5", None)
    return DataParams(**kw)


def hwc(batch_data: np.ndarray, i: int) -> np.ndarray:
    return batch_data[i].reshape(3, 32, 32).transpose(1, 2, 0)


def test_cifar10_import_and_open(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    made = miniatures.make_cifar10(archive)
    src = get_source("cifar10")
    raw = tmp_path / "raw"
    src.fetch(cfg(dataset="cifar10", archive=str(archive)), raw)
    assert sorted(p.name for p in raw.iterdir()) == ["cifar-10-python.tar.gz"]
    ds = src.open(cfg(dataset="cifar10"), raw)
    assert ds.classes == made["classes"]
    train, test = ds.splits["train"], ds.splits["test"]
    assert len(train) == 20 and len(test) == 6
    assert train.labels.tolist() == [y for b in made["train"] for y in b[b"labels"]]
    # 4 images per batch: image 5 is the second batch's second; CHW planes -> HWC
    assert np.array_equal(train.image(5), hwc(made["train"][1][b"data"], 1))
    assert np.array_equal(test.image(3), hwc(made["test"][0][b"data"], 3))
    assert train.image(0).shape == (32, 32, 3) and train.image(0).dtype == np.uint8


def test_split_pickles_small_and_reloads_in_a_fresh_process(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    made = miniatures.make_cifar10(archive)
    src = get_source("cifar10")
    src.fetch(cfg(dataset="cifar10", archive=str(archive)), tmp_path / "raw")
    train = src.open(cfg(dataset="cifar10"), tmp_path / "raw").splits["train"]
    blob = pickle.dumps(train)
    assert len(blob) < 5_000  # workers get a path and labels, not the pixels
    cifar._PIXELS.clear()  # what a spawned worker sees: no inherited cache
    again = pickle.loads(blob)
    assert np.array_equal(again.image(19), hwc(made["train"][4][b"data"], 3))


def test_cifar100_fine_labels_and_names(tmp_path):
    archive = tmp_path / "c100.tar.gz"  # any name: data.archive points at it
    made = miniatures.make_cifar100(archive)
    src = get_source("cifar100")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    src.fetch(cfg(dataset="cifar100", archive=str(archive), md5=md5), tmp_path / "raw")
    ds = src.open(cfg(dataset="cifar100"), tmp_path / "raw")
    assert len(ds.classes) == 100 and ds.classes[7] == "class_07"
    assert ds.splits["train"].labels.tolist() == made["train"][0][b"fine_labels"]
    assert np.array_equal(ds.splits["test"].image(4), hwc(made["test"][0][b"data"], 4))


def test_archive_folder_is_accepted(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    miniatures.make_cifar100(folder / "cifar-100-python.tar.gz")
    get_source("cifar100").fetch(cfg(dataset="cifar100", archive=str(folder)), tmp_path / "raw")
    assert (tmp_path / "raw/cifar-100-python.tar.gz").is_file()


def test_default_md5_refuses_a_repack(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    miniatures.make_cifar10(archive)
    raw = tmp_path / "raw"
    with pytest.raises(UserError, match=r"expected c58f30108f718f92721af3b95e74349a.*data\.md5: null"):
        get_source("cifar10").fetch(cfg(dataset="cifar10", archive=str(archive), md5="default"), raw)
    assert not raw.exists() or list(raw.iterdir()) == []


def test_wrong_layout_is_refused_and_removed(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    miniatures.make_cifar100(archive)  # a CIFAR-100 archive given as CIFAR-10
    with pytest.raises(UserError, match="not the CIFAR-10 python archive.*data_batch_1"):
        get_source("cifar10").fetch(cfg(dataset="cifar10", archive=str(archive)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


class RunsCommand:
    """What a tampered archive would smuggle: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("payload", ["whole batch", "inside data", "eval"])
def test_tampered_archive_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = {
        "whole batch": RunsCommand(marker),
        "inside data": {b"data": RunsCommand(marker), b"labels": [0]},
        "eval": {b"data": CallsEval(), b"labels": [0]},
    }[payload]
    archive = tmp_path / "cifar-10-python.tar.gz"
    miniatures.make_cifar10(archive, extra={"test_batch": miniatures.py2_pickle(evil)})
    src = get_source("cifar10")
    src.fetch(cfg(dataset="cifar10", archive=str(archive)), tmp_path / "raw")  # layout is fine
    with pytest.raises(UserError) as e:
        src.open(cfg(dataset="cifar10"), tmp_path / "raw")
    msg = str(e.value)
    assert "cifar-10-batches-py/test_batch" in msg and "refusing" in msg
    assert ("posix.system" in msg) if payload != "eval" else ("__builtin__.eval" in msg)  # py2 name
    assert not marker.exists()


def test_download_from_mirror_and_offline_message(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    miniatures.make_cifar10(site / "cifar-10-python.tar.gz")
    md5 = hashlib.md5((site / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    src = get_source("cifar10")
    with serve(site) as base:
        src.fetch(cfg(dataset="cifar10", url=base + "cifar-10-python.tar.gz", md5=md5), tmp_path / "raw")
    assert len(src.open(cfg(dataset="cifar10"), tmp_path / "raw").splits["train"]) == 20

    with pytest.raises(UserError) as e:
        src.fetch(cfg(dataset="cifar10", url=closed_port_url(), md5="default"), tmp_path / "offline")
    msg = str(e.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert "data.archive" in msg and "data.dataset: digits" in msg


def test_end_to_end_through_prepare_with_worker_processes(tmp_path, monkeypatch):
    """download -> preprocess on the miniature archive, decoding in two worker processes."""
    import json

    from vitpipe.data import prepare

    archive = tmp_path / "cifar-10-python.tar.gz"
    made = miniatures.make_cifar10(archive, per_batch=10, n_test=10)  # every class in every batch
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "CHUNK", 4)  # several chunks, so the process pool really runs
    c = cfg(
        dataset="cifar10", archive=str(archive), image_size=40, workers=2, split={"train": 0.8, "val": 0.2, "test": 0.0}
    )
    get_source("cifar10").fetch(c, c.raw_dir)
    meta = prepare.prepare(c)
    store = tmp_path / "data/prepared/cifar10"
    assert json.loads((store / "meta.json").read_text()) == meta
    assert meta["classes"] == made["classes"] and meta["official_test_split"] is True
    sizes = meta["sizes"]  # stratified per class: 4 + 1 of each class's 5 training images
    assert sizes["test"] == 10 and sizes["train"] + sizes["val"] == 50 and sizes["val"] == 10
    assert meta["skipped_total"] == 0
    test_x, test_y = np.load(store / "test_x.npy"), np.load(store / "test_y.npy")
    assert test_x.shape == (10, 40, 40, 3) and test_x.dtype == np.uint8
    assert test_y.tolist() == made["test"][0][b"labels"]
    expected = prepare.resize(np.ascontiguousarray(hwc(made["test"][0][b"data"], 5)), 40)
    assert np.array_equal(test_x[5], expected)
    train_y = np.concatenate([np.load(store / "train_y.npy"), np.load(store / "val_y.npy")])
    assert sorted(train_y.tolist()) == sorted(y for b in made["train"] for y in b[b"labels"])


def test_repack_with_dot_slash_names_and_other_compression(tmp_path):
    import tarfile

    official = tmp_path / "official.tar.gz"
    made = miniatures.make_cifar100(official)
    repack = tmp_path / "cifar100-repack.tar.xz"  # `tar cJf x.tar.xz ./cifar-100-python`
    with tarfile.open(official) as src, tarfile.open(repack, "w:xz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m) if m.isreg() else None
            m.name = "./" + m.name
            dst.addfile(m, data)
    src = get_source("cifar100")
    src.fetch(cfg(dataset="cifar100", archive=str(repack)), tmp_path / "raw")
    ds = src.open(cfg(dataset="cifar100"), tmp_path / "raw")
    assert ds.splits["test"].labels.tolist() == made["test"][0][b"fine_labels"]


# ---------------------------------------------------------------- Python 3 re-packs and what is refused


def _open_both(tmp_path, archive):
    src = get_source("cifar10")
    raw = tmp_path / "raw"
    src.fetch(cfg(dataset="cifar10", archive=str(archive)), raw)
    return src.open(cfg(dataset="cifar10"), raw)


@pytest.mark.parametrize(
    "protocol,encoding",
    [(0, "bytes"), (1, "bytes"), (2, "bytes"), (3, "bytes"), (4, "bytes"), (5, "bytes"), (2, "latin1")],
)
def test_python3_repack_loads_the_same_arrays(tmp_path, protocol, encoding):
    official = tmp_path / "official.tar.gz"
    made = miniatures.make_cifar10(official)
    repack = tmp_path / "cifar-10-python.tar.gz"
    miniatures.repack_cifar(official, repack, protocol, encoding)
    ds = _open_both(tmp_path, repack)
    assert ds.classes == made["classes"]
    train = ds.splits["train"]
    assert train.labels.tolist() == [y for b in made["train"] for y in b[b"labels"]]
    expected = np.concatenate([b[b"data"] for b in made["train"]])
    assert all(np.array_equal(train.image(i), hwc(expected, i)) for i in range(len(train)))
    assert np.array_equal(ds.splits["test"].image(5), hwc(made["test"][0][b"data"], 5))


def test_python3_protocol_2_spellings_of_bytes():
    """What Python 3 writes for bytes below protocol 3: `_codecs.encode(str, 'latin1')`, and `bytes()` for b""."""
    batch = {
        b"data": np.arange(3072, dtype=np.uint8).reshape(1, 3072),
        b"labels": [3],
        b"empty": b"",
        b"latin": bytes(range(256)),
    }
    blob = pickle.dumps(batch, protocol=2)
    assert b"_codecs\nencode" in blob and b"__builtin__\nbytes" in blob
    got = cifar.load_batch(io.BytesIO(blob), "a.tar.gz", "m")
    assert got[b"empty"] == b"" and got[b"latin"] == bytes(range(256)) and got[b"labels"] == [3]
    assert np.array_equal(got[b"data"], batch[b"data"])


class Reduces:
    """Pickles as `func(*args)`: what a tampered batch would make the unpickler call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class SomeClass:
    pass


def _evil(marker):
    import codecs
    import subprocess

    return {  # name: (payload, protocol, what the message names)
        "os.system, protocol 2": (Reduces(os.system, f"touch {marker}"), 2, "`posix.system`"),
        "os.system, protocol 4": (Reduces(os.system, f"touch {marker}"), 4, "`posix.system`"),
        "eval, protocol 2": (Reduces(eval, "1"), 2, "`__builtin__.eval`"),
        "eval, protocol 5": (Reduces(eval, "1"), 5, "`builtins.eval`"),
        "subprocess, protocol 2": (Reduces(subprocess.call, ["touch", str(marker)]), 2, "`commands.call`"),
        "subprocess, protocol 4": (Reduces(subprocess.call, ["touch", str(marker)]), 4, "`subprocess.call`"),
        "any class": ({b"data": SomeClass(), b"labels": [0]}, 2, "`test_cifar.SomeClass`"),
        "getattr": (Reduces(getattr, "text", "upper"), 2, "`__builtin__.getattr`"),
        "codecs rot13": (Reduces(codecs.encode, "abc", "rot13"), 2, "`_codecs.encode` with str, 'rot13'"),
        "codecs on bytes": (Reduces(codecs.encode, b"abc", "latin1"), 3, "`_codecs.encode` with bytes"),
        "bytes(n)": (Reduces(bytes, 10**10), 2, "`bytes` with arguments (10000000000,)"),
    }


@pytest.mark.parametrize("case", list(_evil("x")))
def test_anything_but_a_batch_is_refused_in_one_line(tmp_path, case):
    marker = tmp_path / "pwned"
    payload, protocol, named = _evil(marker)[case]
    archive = tmp_path / "cifar-10-python.tar.gz"
    miniatures.make_cifar10(archive, extra={"test_batch": pickle.dumps(payload, protocol=protocol)})
    with pytest.raises(UserError) as e:
        _open_both(tmp_path, archive)
    msg = str(e.value)
    assert "cifar-10-batches-py/test_batch tries to" in msg and named in msg and "refusing to unpickle" in msg
    assert "data.md5: default" in msg and "\n" not in msg
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["cut in the middle", "cut before the trailer", "bad CRC", "empty"])
def test_damaged_archive_is_one_line_and_nothing_lands(tmp_path, damage):
    good = tmp_path / "good.tar.gz"
    miniatures.make_cifar10(good)
    data = good.read_bytes()
    bad = {
        "cut in the middle": data[: len(data) // 2],
        "cut before the trailer": data[:-3],
        "bad CRC": data[:-8] + bytes([data[-8] ^ 1]) + data[-7:],
        "empty": b"",
    }[damage]
    archive = tmp_path / "import/cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(bad)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "cifar-10-python.tar.gz").write_bytes(data)  # a good earlier download stays
    with pytest.raises(UserError) as e:
        get_source("cifar10").fetch(cfg(dataset="cifar10", archive=str(archive)), raw)
    assert f"{archive} is damaged (truncated or corrupt" in str(e.value) and "\n" not in str(e.value)
    assert [p.name for p in raw.iterdir()] == ["cifar-10-python.tar.gz"]
    assert (raw / "cifar-10-python.tar.gz").read_bytes() == data
    # Damaged after the download stage (a bad disk, a hand copy): the preprocess read says so too.
    (raw / "cifar-10-python.tar.gz").write_bytes(bad)
    with pytest.raises(UserError, match="is damaged"):
        get_source("cifar10").open(cfg(dataset="cifar10"), raw)


def test_damaged_download_is_removed(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    miniatures.make_cifar10(site / "cifar-10-python.tar.gz")
    data = (site / "cifar-10-python.tar.gz").read_bytes()
    (site / "cifar-10-python.tar.gz").write_bytes(data[: len(data) // 2])
    with serve(site) as base, pytest.raises(UserError, match="is damaged"):
        get_source("cifar10").fetch(cfg(dataset="cifar10", url=base + "cifar-10-python.tar.gz"), tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []
