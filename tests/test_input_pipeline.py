"""vitpipe.training.input_pipeline: batches made ahead in a background thread are the same
numbers as batches made on demand, for every (seed, step, micro-batch), resumed or not, from
a store in RAM or memory-mapped."""

import json
import threading

import numpy as np
import pytest
import torch

from vitpipe.data import prepared_store
from vitpipe.data.prepared_store import PreparedStore, Split, shift_and_flip
from vitpipe.models import build_model
from vitpipe.params import TrainParams
from vitpipe.training.input_pipeline import InputPipeline, augmentation_generator
from vitpipe.training.loop import RunPaths, TrainingJob, fit

SPEC = {"arch": "vit", "patch": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0}


def synthetic(n=96, size=16, classes=4, seed=0, hflip=True) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Split(x, rng.integers(0, classes, n), [0.5] * 3, [0.25] * 3, hflip=hflip)


def reference_shift_and_flip(x, generator, hflip):
    """The augmentation as first written (a padded copy and one advanced-indexing gather):
    the definition the one-window-per-image version must reproduce draw for draw."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows, cols = dy[:, None] + torch.arange(h)[None, :], dx[:, None] + torch.arange(w)[None, :]
    out = padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(3)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def reference_batch(data: Split, idx, augment: bool, generator):
    """Split.batch before the input pipeline: gather, to float, augment in float, normalise."""
    idx = np.sort(np.asarray(idx))
    x = torch.from_numpy(np.ascontiguousarray(data.x[idx])).permute(0, 3, 1, 2).float()
    if augment:
        x = reference_shift_and_flip(x, generator, data.hflip)
    return (x - data.mean) / data.std, data.y[torch.from_numpy(idx)]


@pytest.mark.parametrize("size", [8, 16, 17, 32, 49, 64])  # both paths: up to 48 px one gather, above a copy per image
@pytest.mark.parametrize("hflip", [True, False])
def test_shift_and_flip_reproduces_the_reference_draw_for_draw(size, hflip):
    x = torch.from_numpy(np.random.default_rng(size).integers(0, 256, (40, 3, size, size), dtype=np.uint8))
    for seed in range(3):
        a = shift_and_flip(x, torch.Generator().manual_seed(seed), hflip)
        b = reference_shift_and_flip(x, torch.Generator().manual_seed(seed), hflip)
        assert torch.equal(a, b)
    shifted = shift_and_flip(x, torch.Generator().manual_seed(0), hflip)
    assert not torch.equal(shifted, x) and (shifted == 0).any()  # it does move the images, zero-padded


def test_split_batch_is_the_reference_batch_and_images_write_into_a_buffer():
    data = synthetic()
    idx = np.array([5, 3, 77, 12, 40])
    for augment in (False, True):
        a = data.batch(idx, augment, torch.Generator().manual_seed(7))
        b = reference_batch(data, idx, augment, torch.Generator().manual_seed(7))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        buffer = torch.full((8, 3, 16, 16), 99, dtype=torch.uint8)
        x, _ = data.images(idx, augment, torch.Generator().manual_seed(7), out=buffer)
        assert x.data_ptr() == buffer.data_ptr() and torch.equal(data.normalise(x), a[0])


def batches(pipe: InputPipeline, steps, mine):
    out = {}
    for s in steps:
        for m in mine:
            x, y = pipe.get(s, m)
            out[s, m] = (x.clone(), y.clone())
    pipe.close()
    return out


def test_prefetching_gives_the_same_numbers_for_every_seed_step_and_micro_batch():
    """...and for every split of the batch: a micro-batch's images are augmented as they are
    in the whole batch (the batch's draws, each image the one of its place in the sorted batch)."""
    data = synthetic()
    bs, mb, steps = 32, 8, 9  # 4 micro-batches a step; 9 steps pass an epoch boundary (96 images)
    for seed in (0, 3):

        def pipeline(prefetch, start=0, mine=(0, 1, 2, 3), seed=seed, mb=mb):
            return InputPipeline(
                data, seed, bs, mb, list(mine), True, torch.device("cpu"), start, steps, prefetch=prefetch
            )

        on_demand = batches(pipeline(0), range(steps), range(4))
        ahead = batches(pipeline(4), range(steps), range(4))
        resumed = batches(pipeline(3, start=5), range(5, steps), range(4))  # a run resumed at step 5
        whole = batches(pipeline(0, mine=(0,), mb=bs), range(steps), (0,))  # the same batches unsplit
        for (s, m), (x, y) in on_demand.items():
            batch = data_order(data, seed, s, bs)
            ref = reference_batch(data, batch, True, augmentation_generator(seed, s))
            assert torch.equal(whole[s, 0][0], ref[0]) and torch.equal(whole[s, 0][1], ref[1]), (seed, s)
            place = np.argsort(np.argsort(batch, kind="stable"), kind="stable")  # each image's row in ref
            mine = batch[m * mb : (m + 1) * mb]
            rows = torch.from_numpy(place[m * mb : (m + 1) * mb][np.argsort(mine, kind="stable")])
            assert torch.equal(x, ref[0][rows]) and torch.equal(y, ref[1][rows]), (seed, s, m)
            assert torch.equal(ahead[s, m][0], x) and torch.equal(ahead[s, m][1], y), (seed, s, m)
            if s >= 5:
                assert torch.equal(resumed[s, m][0], x), (seed, s, m)
        # a DDP rank's share (micro-batches 1 and 3) is the same numbers as in one process
        rank1 = batches(pipeline(2, mine=(1, 3)), range(steps), (1, 3))
        assert all(torch.equal(x, on_demand[k][0]) for k, (x, _) in rank1.items())
    assert not torch.equal(on_demand[0, 0][0], on_demand[1, 0][0])


def data_order(data, seed, step, bs):
    return prepared_store.SampleStream(len(data), seed).take(step * bs, bs)


def test_a_memory_mapped_store_gives_the_same_batches(tmp_path, monkeypatch):
    data = synthetic()
    np.save(tmp_path / "train_x.npy", data.x)
    np.save(tmp_path / "train_y.npy", data.y.numpy())
    (tmp_path / "meta.json").write_text(
        json.dumps(
            {
                "classes": list("abcd"),
                "num_classes": 4,
                "image_size": 16,
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
                "hflip": True,
            }
        )
    )
    monkeypatch.setattr(prepared_store, "IN_RAM_BYTES", 0)  # every split is "big"
    mapped = PreparedStore(tmp_path).split("train")
    assert isinstance(mapped.x, np.memmap)
    a = batches(InputPipeline(mapped, 1, 16, 8, [0, 1], True, torch.device("cpu"), 0, 7, prefetch=3), range(7), (0, 1))
    b = batches(InputPipeline(data, 1, 16, 8, [0, 1], True, torch.device("cpu"), 0, 7, prefetch=0), range(7), (0, 1))
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in b)


def test_an_error_in_the_background_reaches_the_loop_and_close_stops_the_thread():
    data = synthetic(n=40)
    data.x = data.x[:20]  # labels for 40 images, pixels for 20: the gather fails in the thread
    pipe = InputPipeline(data, 0, 16, 16, [0], False, torch.device("cpu"), 0, 10, prefetch=2)
    with pytest.raises(IndexError):
        for s in range(10):
            pipe.get(s, 0)
    pipe.close()
    full = InputPipeline(synthetic(), 0, 16, 8, [0, 1], False, torch.device("cpu"), 0, 1000, prefetch=2)
    full.get(0, 0)  # its thread now waits on a full queue
    with pytest.raises(RuntimeError, match="out of order: made step 0 micro-batch 1, the loop wants step 1"):
        full.get(1, 0)
    full.close()
    assert not full.thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "vitpipe-input"]


def test_on_the_cpu_the_thread_runs_only_beside_a_free_core(monkeypatch):
    import vitpipe.training.input_pipeline as ip

    monkeypatch.setattr(ip, "cpu_count", lambda: 4)
    threads = torch.get_num_threads()
    try:
        for n, expected in ((4, 0), (3, ip.PREFETCH), (1, ip.PREFETCH)):
            torch.set_num_threads(n)
            assert InputPipeline(synthetic(), 0, 16, 8, [0, 1], True, torch.device("cpu"), 0, 4).prefetch == expected, n
    finally:
        torch.set_num_threads(threads)


def test_fit_logs_host_data_time_per_step(tmp_path):
    torch.manual_seed(0)
    r = TrainParams(
        steps=4, batch_size=16, micro_batch=8, lr=1e-3, warmup_steps=1, checkpoint_every=2, eval_every=None, seed=0
    )
    paths = RunPaths(weights=tmp_path / "model.pt", metrics=tmp_path / "metrics.json", plots=tmp_path / "plots")
    fit(
        TrainingJob(
            build_model(SPEC, 4, 16),
            synthetic(),
            r,
            paths,
            val=None,
            run_config={"spec": SPEC, "image_size": 16},
            fresh_key="train.resume",
            weights_meta={"spec": SPEC, "num_classes": 4, "image_size": 16},
            desc="test",
            quiet=True,
            store_dir=tmp_path / "store",
        )
    )
    lines = (paths.plots / "train.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    assert all(0 < float(row["data_ms"]) < 5_000 and float(row["data_wait_ms"]) >= 0 for row in rows)
    assert not [t for t in threading.enumerate() if t.name == "vitpipe-input"]  # fit closed its pipeline


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_pipeline_is_the_cpu_batch():
    """Pinned buffers, the side-stream copy and normalising on the GPU: the CPU's images and
    labels (the normalisation's two correctly rounded operations may differ by an ulp)."""
    data, dev = synthetic(), torch.device("cuda")
    gpu = batches(InputPipeline(data, 0, 32, 8, [0, 1, 2, 3], True, dev, 0, 6, channels_last=True), range(6), range(4))
    cpu = batches(
        InputPipeline(data, 0, 32, 8, [0, 1, 2, 3], True, torch.device("cpu"), 0, 6, prefetch=0), range(6), range(4)
    )
    for k, (x, y) in cpu.items():
        assert gpu[k][0].is_cuda and torch.allclose(gpu[k][0].cpu(), x, rtol=1e-6, atol=1e-6), k
        assert torch.equal(gpu[k][1].cpu(), y), k


@pytest.mark.parametrize("threads", [2, 3])
def test_large_images_shifted_over_threads_are_the_reference_bytes(threads):
    """augment_threads spreads the per-image window copies of large images over threads: the
    same bytes as the reference (and one thread), into a pinned-style buffer too."""
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (40, 3, 64, 64), dtype=np.uint8))
    for seed in range(3):
        ref = reference_shift_and_flip(x, torch.Generator().manual_seed(seed), True)
        assert torch.equal(shift_and_flip(x, torch.Generator().manual_seed(seed), True, threads=threads), ref)
        buffer = torch.full((48, 3, 64, 64), 99, dtype=torch.uint8)
        shift_and_flip(x, torch.Generator().manual_seed(seed), True, out=buffer, threads=threads)
        assert torch.equal(buffer[:40], ref) and (buffer[40:] == 99).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_large_images_are_read_by_the_threads_that_shift_them(tmp_path, threads):
    """Split.images reads each large image from the store (a memmap here) in the thread that
    shifts it: the bytes of the reference applied to the gathered batch, in sorted order."""
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (30, 64, 64, 3), dtype=np.uint8))
    store = np.load(tmp_path / "x.npy", mmap_mode="r")
    data = Split(store, rng.integers(0, 4, 30), [0.5] * 3, [0.25] * 3, hflip=True)
    idx = np.array([17, 3, 29, 3, 8, 0, 21, 12, 5, 26])
    x, y = data.images(idx, True, torch.Generator().manual_seed(4), threads=threads)
    gathered = torch.from_numpy(np.ascontiguousarray(store[np.sort(idx)])).permute(0, 3, 1, 2)
    assert torch.equal(x, reference_shift_and_flip(gathered, torch.Generator().manual_seed(4), True))
    assert torch.equal(y, data.y[torch.from_numpy(np.sort(idx))])
