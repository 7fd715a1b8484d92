"""Concurrent CPU trainings on one machine split its cores between them, with nothing set."""

import os

import pytest
import torch

from vitpipe.hardware.core_share import CoreShare
from vitpipe.hardware.probe import cpu_count as cpu_cores


@pytest.fixture
def default_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("VITPIPE_CORE_SHARE", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_cores())
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(cpu_cores() < 2, reason="needs at least 2 cores to share")
def test_two_live_trainings_take_half_the_cores_each(tmp_path, default_threads):
    cores = cpu_cores()
    (tmp_path / "999999999").write_text("")  # a killed process's lease: ignored and removed
    with CoreShare(torch.device("cpu"), tmp_path) as share:
        assert share.active and torch.get_num_threads() == cores
        assert not (tmp_path / "999999999").exists()
        (tmp_path / str(os.getppid())).write_text("")  # another live training starts
        share.rebalance()
        assert torch.get_num_threads() == max(1, cores // 2)
        (tmp_path / str(os.getppid())).unlink()  # it ends
        share.rebalance()
        assert torch.get_num_threads() == cores
    assert not (tmp_path / str(os.getpid())).exists()  # our lease is gone too


def test_the_users_choice_wins(tmp_path, default_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not CoreShare(torch.device("cpu"), tmp_path).active
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("VITPIPE_CORE_SHARE", "0")
    assert not CoreShare(torch.device("cpu"), tmp_path).active
    monkeypatch.delenv("VITPIPE_CORE_SHARE")
    assert not CoreShare(torch.device("cpu"), tmp_path, world=2).active  # DDP shares by itself
    torch.set_num_threads(1)  # set by hand
    assert not CoreShare(torch.device("cpu"), tmp_path).active
