"""Safe extraction, md5 checks and downloads (through a loopback HTTP server only)."""

import contextlib
import functools
import hashlib
import http.server
import io
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from vitpipe.data import archives
from vitpipe.data.archives import check_md5, download, import_file, md5_file, safe_extract
from vitpipe.errors import UserError


def make_tar(path: Path, members, mode="w:gz"):
    """members: (name, kind, payload): kind file|dir|sym|lnk|chr|fifo."""
    with tarfile.open(path, mode) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                data = payload
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "lnk":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def make_zip(path: Path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, kind, payload in members:
            if kind == "sym":
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o120777 << 16
                zf.writestr(info, payload)
            else:
                zf.writestr(name, payload)
    return path


def leftovers(folder: Path, keep) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


GOOD = [
    ("top", "dir", None),
    ("top/a.txt", "file", b"alpha"),
    ("top/sub/b.txt", "file", b"beta"),
    ("top/link_to_a", "sym", "a.txt"),
    ("top/sub/hard_a", "lnk", "top/a.txt"),
]


@pytest.mark.parametrize(
    "mode,suffix", [("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz"), ("w", ".tar")]
)
def test_extracts_tar_in_any_compression(tmp_path, mode, suffix):
    archive = make_tar(tmp_path / f"good{suffix}", GOOD, mode)
    dest = safe_extract(archive, tmp_path / "out")
    assert (dest / "top/a.txt").read_bytes() == b"alpha"
    assert (dest / "top/sub/b.txt").read_bytes() == b"beta"
    assert os.readlink(dest / "top/link_to_a") == "a.txt" and (dest / "top/link_to_a").read_bytes() == b"alpha"
    assert (dest / "top/sub/hard_a").read_bytes() == b"alpha" and not (dest / "top/sub/hard_a").is_symlink()
    assert leftovers(tmp_path, {archive.name, "out"}) == []


def test_extracts_zip_replaces_dest_and_filters(tmp_path):
    archive = make_zip(
        tmp_path / "good.zip", [("d/x.jpg", "file", b"x"), ("d/notes.txt", "file", b"n"), ("d/inner", "sym", "x.jpg")]
    )
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale").write_text("from before")
    safe_extract(archive, dest, keep=lambda name: not name.endswith(".txt"))
    assert sorted(p.name for p in (dest / "d").iterdir()) == ["inner", "x.jpg"]
    assert not (dest / "stale").exists()  # dest is replaced as a whole
    assert leftovers(tmp_path, {archive.name, "out"}) == []


def test_merges_several_archives(tmp_path):
    a = make_tar(tmp_path / "a.tar.gz", [("images/1.jpg", "file", b"1")])
    b = make_tar(tmp_path / "b.tar.gz", [("annotations/list.txt", "file", b"l")])
    dest = safe_extract([a, b], tmp_path / "raw")
    assert (dest / "images/1.jpg").exists() and (dest / "annotations/list.txt").exists()


EVIL_TAR = {
    "traversal": [("ok.txt", "file", b"fine"), ("../evil.txt", "file", b"pwned")],
    "deep traversal": [("a/b/../../../evil.txt", "file", b"pwned")],
    "absolute": [("/tmp/vitpipe_evil_abs.txt", "file", b"pwned")],
    "symlink absolute": [("link", "sym", "/etc")],
    "symlink outside": [("d", "dir", None), ("d/link", "sym", "../../evil_dir")],
    "write through symlink": [("link", "sym", ".."), ("link/evil.txt", "file", b"pwned")],
    "link after link": [("d", "sym", "."), ("l", "sym", "d/../evil.txt")],
    "link redirected later": [("l", "sym", "later/../evil.txt"), ("later", "sym", ".")],
    "write through link chain": [("d", "sym", "."), ("l", "sym", "d/.."), ("l/evil.txt", "file", b"pwned")],
    "hardlink outside": [("hl", "lnk", "../evil.txt")],
    "hardlink absolute": [("hl", "lnk", "/etc/passwd")],
    "char device": [("ok.txt", "file", b"fine"), ("null", "chr", None)],
    "fifo": [("pipe", "fifo", None)],
}


@pytest.mark.parametrize("case", list(EVIL_TAR))
def test_refuses_dangerous_tar_members_and_leaves_nothing(tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    archive = make_tar(tmp_path / "evil.tar.gz", EVIL_TAR[case])
    with pytest.raises(UserError, match="refusing to extract"):
        safe_extract(archive, work / "out")
    assert list(work.iterdir()) == []  # no dest, no temp folder
    assert not (tmp_path / "evil.txt").exists() and not (work / "evil.txt").exists()
    assert not Path("/tmp/vitpipe_evil_abs.txt").exists()


@pytest.mark.parametrize(
    "name,kind,payload",
    [
        ("../evil.txt", "file", b"pwned"),
        ("/abs/evil.txt", "file", b"x"),
        ("..\\evil.txt", "file", b"x"),
        ("C:/evil.txt", "file", b"x"),
        ("link", "sym", "../../etc"),
    ],
)
def test_refuses_zip_slip(tmp_path, name, kind, payload):
    work = tmp_path / "work"
    work.mkdir()
    archive = make_zip(tmp_path / "evil.zip", [("ok.txt", "file", b"fine"), (name, kind, payload)])
    with pytest.raises(UserError, match="refusing to extract"):
        safe_extract(archive, work / "out")
    assert list(work.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_damaged_archive_is_a_user_error(tmp_path):
    good = make_tar(tmp_path / "good.tar.gz", [("big.bin", "file", os.urandom(50_000))])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(UserError, match="damaged|not a readable"):
        safe_extract(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_md5_stream_and_mismatch(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(os.urandom(3 * archives.CHUNK + 7))
    assert md5_file(f) == hashlib.md5(f.read_bytes()).hexdigest()
    check_md5(f, md5_file(f).upper())  # case does not matter
    check_md5(f, None)  # null: accept anything
    with pytest.raises(UserError, match=r"md5 is .* expected 0{32}.*data\.md5: null"):
        check_md5(f, "0" * 32)


def test_import_file_verifies_before_it_lands(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    with pytest.raises(UserError, match="md5"):
        import_file(src, tmp_path / "raw/dest.bin", "0" * 32)
    assert list((tmp_path / "raw").iterdir()) == []
    import_file(src, tmp_path / "raw/dest.bin", hashlib.md5(b"payload").hexdigest())
    assert (tmp_path / "raw/dest.bin").read_bytes() == b"payload"
    with pytest.raises(UserError, match="is not a file"):
        import_file(tmp_path / "missing.tar.gz", tmp_path / "raw/x", None)


@contextlib.contextmanager
def serve(folder: Path):
    """An HTTP server on 127.0.0.1 (loopback only) serving `folder`; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"  # nothing listens there any more


def test_download_through_local_server(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    payload = os.urandom(2 * archives.CHUNK + 11)
    (site / "file.tar.gz").write_bytes(payload)
    good = hashlib.md5(payload).hexdigest()
    raw = tmp_path / "raw"
    with serve(site) as base:
        out = download(base + "file.tar.gz", raw / "file.tar.gz", good)
        assert out.read_bytes() == payload
        out.unlink()
        with pytest.raises(UserError, match=f"md5 is {good}, expected f{{32}}"):
            download(base + "file.tar.gz", raw / "file.tar.gz", "f" * 32)
        assert list(raw.iterdir()) == []  # neither the file nor its temp
        with pytest.raises(UserError, match="404"):
            download(base + "missing.tar.gz", raw / "missing.tar.gz", None)


def test_offline_message_says_what_where_and_which_param(tmp_path):
    official = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    with pytest.raises(UserError) as e:
        download(
            closed_port_url(),
            tmp_path / "raw/cifar-10-python.tar.gz",
            None,
            official_url=official,
            archive_hint="`data.archive: <path to cifar-10-python.tar.gz>`",
        )
    msg = str(e.value)
    assert official in msg and "cifar-10-python.tar.gz" in msg
    assert "data.archive" in msg and "data.dataset: digits" in msg and "data/downloads/" in msg
    assert "\n" not in msg
    assert not (tmp_path / "raw/cifar-10-python.tar.gz").exists()


# ---------------------------------------------------------------- damaged archives


def _members(n=3, size=20_000):
    return [(f"top/{i}.bin", "file", os.urandom(size)) for i in range(n)]  # random: stored, not shrunk


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def _second_header(path: Path) -> int:
    with tarfile.open(path) as tar:
        return tar.getmembers()[1].offset


DAMAGE = {  # name: (suffix, tar mode or "zip", how to damage the bytes of a good archive)
    "tar.gz cut in the middle": (".tar.gz", "w:gz", lambda b, p: b[: len(b) // 2]),
    "tar.gz cut before its trailer": (".tar.gz", "w:gz", lambda b, p: b[:-4]),
    "tar.gz with a bad CRC": (".tar.gz", "w:gz", lambda b, p: _flip(b, len(b) - 6)),
    "tar.gz with a flipped data byte": (".tar.gz", "w:gz", lambda b, p: _flip(b, len(b) // 2)),
    "tar.bz2 cut": (".tar.bz2", "w:bz2", lambda b, p: b[: len(b) * 2 // 3]),
    "tar.xz cut": (".tar.xz", "w:xz", lambda b, p: b[: len(b) // 2]),
    "tar cut between members": (".tar", "w", lambda b, p: b[: _second_header(p)]),
    "tar with a garbled header": (
        ".tar",
        "w",
        lambda b, p: b[: _second_header(p)] + b"x" * 512 + b[_second_header(p) + 512 :],
    ),
    "tar cut inside a member": (".tar", "w", lambda b, p: b[: _second_header(p) + 5000]),
    "zip cut": (".zip", "zip", lambda b, p: b[: len(b) // 2]),
    "zip with a flipped data byte": (".zip", "zip", lambda b, p: _flip(b, 1000)),
    "empty file": (".tar.gz", "w:gz", lambda b, p: b""),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_archive_is_one_line_and_leaves_dest_as_it_was(tmp_path, case):
    suffix, mode, damage = DAMAGE[case]
    good = tmp_path / f"good{suffix}"
    make_zip(good, _members()) if mode == "zip" else make_tar(good, _members(), mode)
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(damage(good.read_bytes(), good))
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out/before.txt").write_text("an earlier good extraction")
    with pytest.raises(UserError) as e:
        safe_extract(bad, work / "out")
    msg = str(e.value)
    assert f"{bad} is damaged (truncated or corrupt" in msg and "nothing was extracted" in msg and "\n" not in msg
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # no temp folder left
    assert [p.name for p in (work / "out").iterdir()] == ["before.txt"]
    assert (work / "out/before.txt").read_text() == "an earlier good extraction"
    assert safe_extract(good, work / "out") and len(list((work / "out/top").iterdir())) == 3  # the good one is fine


def test_not_an_archive_and_unreadable_zip_members(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"hello " * 100)
    with pytest.raises(UserError, match=r"junk.tar.gz is not a tar archive \(.tar, .tar.gz"):
        safe_extract(junk, tmp_path / "out")
    # An encrypted member (flag bit 0 in its local and central headers): zipfile cannot read it.
    enc = make_zip(tmp_path / "enc.zip", [("d/a.jpg", "file", b"secret")])
    data = bytearray(enc.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(sig) + flag_at] |= 0x01
    enc.write_bytes(bytes(data))
    with pytest.raises(
        UserError,
        match=r"enc.zip: member 'd/a.jpg' cannot be read \(it is encrypted\); nothing was "
        r"extracted. Re-pack it",
    ):
        safe_extract(enc, tmp_path / "out")
    deflate64 = make_zip(tmp_path / "d64.zip", [("d/a.jpg", "file", b"x")])
    data = bytearray(deflate64.read_bytes())
    for sig, method_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        data[data.index(sig) + method_at] = 9  # compression method 9: deflate64
    deflate64.write_bytes(bytes(data))
    with pytest.raises(
        UserError,
        match=r"d64.zip: member 'd/a.jpg' cannot be read \(its compression method is not "
        r"supported\)",
    ):
        safe_extract(deflate64, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d64.zip", "enc.zip", "junk.tar.gz"]


def test_temp_folders_of_a_killed_run_are_cleared(tmp_path):
    for stale in (".out.abc123.extract", ".out.def456.stage", ".out.x.old"):
        (tmp_path / stale / "half").mkdir(parents=True)
    (tmp_path / ".other.abc.extract").mkdir()  # another destination's: not ours to remove
    archive = make_tar(tmp_path / "good.tar.gz", [("a.txt", "file", b"a")])
    safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.abc.extract", "good.tar.gz", "out"]


def test_check_refuses_the_extracted_whole_before_it_lands(tmp_path):
    archive = make_tar(tmp_path / "a.tar.gz", [("x.txt", "file", b"x")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out/old.txt").write_text("old")

    def check(folder):
        assert (folder / "x.txt").read_bytes() == b"x"
        raise UserError("wrong layout")

    with pytest.raises(UserError, match="wrong layout"):
        safe_extract(archive, tmp_path / "out", check=check)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
