"""The preprocess stage's store and the batches made from it, on the embedded digits."""

import json

import numpy as np
import pytest
import torch

from vitpipe.data.prepare import stratified_split
from vitpipe.data.prepared_store import PreparedStore, SampleStream


@pytest.fixture(scope="module")
def store(prepared):
    root = prepared / "prepared" / "digits"
    return root, json.loads((root / "meta.json").read_text())


def test_store_layout_and_meta(store):
    root, meta = store
    assert meta["sizes"] == {"train": 1258, "val": 180, "test": 359}
    assert sum(meta["sizes"].values()) == 1797 and meta["num_classes"] == 10
    for split, n in meta["sizes"].items():
        x = np.load(root / f"{split}_x.npy", mmap_mode="r")
        y = np.load(root / f"{split}_y.npy")
        assert x.shape == (n, 16, 16, 3) and x.dtype == np.uint8 and len(y) == n
    assert json.loads((root / "meta.json").read_text()) == meta
    assert (root / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    # digits are grey: the three channels are equal, and so are their statistics
    x = np.load(root / "train_x.npy")
    assert np.array_equal(x[..., 0], x[..., 2])
    assert meta["mean"][0] == pytest.approx(x.mean() / 255, abs=1e-4)
    assert meta["std"][0] == pytest.approx((x / 255).std(), abs=1e-3)


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), 40)
    a = stratified_split(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    b = stratified_split(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    c = stratified_split(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"])
    every = np.concatenate(list(a.values()))
    assert len(every) == 200 and len(np.unique(every)) == 200
    for k, f in (("train", 28), ("val", 4), ("test", 8)):
        assert np.bincount(labels[a[k]]).tolist() == [f] * 5


def test_batches_are_normalised_and_deterministic(store):
    root, meta = store
    split = PreparedStore(root).split("train")
    idx = SampleStream(len(split), seed=0).take(0, 32)
    x, y = split.batch(idx)
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
    full, _ = split.batch(np.arange(len(split)))
    assert full.mean().item() == pytest.approx(0.0, abs=1e-3) and full.std().item() == pytest.approx(1.0, abs=1e-2)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, _ = split.batch(idx, augment=True, generator=g1)
    b, _ = split.batch(idx, augment=True, generator=g2)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(y, split.y[torch.from_numpy(np.sort(idx))])


def test_sample_stream_covers_each_epoch_once_and_resumes():
    s = SampleStream(10, seed=1)
    first_two_epochs = s.take(0, 20)
    assert sorted(first_two_epochs[:10]) == list(range(10)) and sorted(first_two_epochs[10:]) == list(range(10))
    assert np.array_equal(SampleStream(10, seed=1).take(7, 6), first_two_epochs[7:13])  # a resumed stream
    assert not np.array_equal(SampleStream(10, seed=2).take(0, 10), first_two_epochs[:10])


def test_meta_records_class_counts_and_no_warnings_for_digits(store):
    _, meta = store
    for split, n in meta["sizes"].items():
        assert len(meta["class_counts"][split]) == 10 and sum(meta["class_counts"][split]) == n
    assert meta["thin_classes"] == [] and meta["warnings"] == []


def test_thin_rule_is_under_a_tenth_of_the_median_per_split():
    from vitpipe.data.sanity import SplitCounts, thin_classes

    classes = ["a", "b", "c", "d", "e"]
    train = np.array([100, 100, 10, 9, 100])  # median 100: 9 is thin, 10 is not
    test = np.array([20, 1, 20, 20, 20])  # median 20: 1 is thin
    warnings, thin = thin_classes(
        "where",
        classes,
        {
            "train": SplitCounts(train, train),
            "val": SplitCounts(train, np.zeros(5, dtype=int)),
            "test": SplitCounts(test, test),
        },
    )
    assert thin == ["d", "b"]
    assert warnings == [
        "where: 1 class(es) with under 10% of the median 100 train images per class: 'd' (9); the model barely "
        "learns them and their accuracy is noise: add images to them or remove them",
        "where: 1 class(es) with under 10% of the median 20 test images per class: 'b' (1); the model barely "
        "learns them and their accuracy is noise: add images to them or remove them",
    ]
    flat = np.full(5, 3)  # small classes: 10% of the median is under one image, nothing is thin
    assert thin_classes("where", classes, {"train": SplitCounts(flat, flat)}) == ([], [])


def test_every_class_needs_train_and_test_but_not_val():
    from vitpipe.data.sanity import SplitCounts, require_every_class
    from vitpipe.errors import UserError

    ok, none = np.array([3, 3]), np.array([3, 0])
    require_every_class(
        "w", ["a", "b"], {"train": SplitCounts(ok, ok), "val": SplitCounts(none, none), "test": SplitCounts(ok, ok)}
    )
    require_every_class("w", ["a", "b"], {"train": SplitCounts(ok, ok), "test": SplitCounts(ok * 0, ok * 0)})  # unused
    with pytest.raises(
        UserError,
        match=r"^w: class 'b' has no readable image in the test split \('b' has 3 image\(s\) "
        r"there and none decodes, e\.g\. b/1\.jpg: broken\)",
    ):
        require_every_class(
            "w", ["a", "b"], {"train": SplitCounts(ok, ok), "test": SplitCounts(ok, none, {1: "b/1.jpg: broken"})}
        )
    many = [f"c{i}" for i in range(8)]
    with pytest.raises(
        UserError,
        match=r"classes 'c1', 'c2', 'c3', 'c4', 'c5' and 2 more have no readable image in "
        r"the train split \('c1' has 0 image\(s\) in all",
    ):
        z = np.array([1] + [0] * 7)
        require_every_class("w", many, {"train": SplitCounts(z, z)})
