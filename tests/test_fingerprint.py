"""A run's fingerprint holds what changes its numbers, not how its batch is split: a finished
run is restored, and an interrupted one resumed, under another micro_batch (a GPU that fits
another split), except for a network whose numbers depend on the split (BatchNorm, dropout)."""

import re

import pytest
import torch
from test_train import (
    SPEC,
    _interrupted,
    assert_identical,
    recipe,
    stored,
    train,
    weights,
)

from vitpipe.models import build_model
from vitpipe.training.loop import split_changes_result

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_finished_run_is_restored_under_another_micro_batch(tmp_path, capfd):
    _, first = train(tmp_path, recipe(micro_batch=8), val=False)
    trained = weights(tmp_path / "model.pt")
    capfd.readouterr()
    _, again = train(tmp_path, recipe(micro_batch=4), val=False)
    said = capfd.readouterr().err
    assert re.search(r"\[test\] restored the finished run [0-9a-f]{16} from ", said), said
    assert again == first
    assert_identical(trained, weights(tmp_path / "model.pt"))


def test_an_interrupted_run_resumes_under_another_micro_batch(tmp_path):
    """Checkpointed at step 8 with micro-batches of 8, resumed with 16 (no accumulation): the
    same run, ending where an uninterrupted run ends up to float rounding."""
    reference, _ = train(tmp_path / "ref", recipe(steps=16, checkpoint_every=100), val=False)
    _interrupted(tmp_path / "run", recipe(steps=16, checkpoint_every=100))
    torch.manual_seed(0)
    model, forwards = build_model(SPEC, 4, 16), []
    model.register_forward_hook(lambda *_: forwards.append(1))
    resumed, _ = train(tmp_path / "run", recipe(steps=16, checkpoint_every=100, micro_batch=16), model=model, val=False)
    assert len(forwards) == 8  # steps 9..16, one micro-batch each: resumed, not started over
    assert stored(tmp_path / "run/store") == {}
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), k


def test_the_split_stays_in_the_fingerprint_where_it_changes_the_numbers(tmp_path, capfd):
    assert not split_changes_result(build_model(SPEC, 4, 16))
    assert split_changes_result(build_model({"arch": "resnet18"}, 4, 16))  # BatchNorm
    dropout = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
    assert split_changes_result(dropout) and not split_changes_result(torch.nn.Sequential(torch.nn.Dropout(0.0)))
    # a ResNet under another micro_batch is another run: trained, not restored
    resnet = {"arch": "resnet18"}
    train(tmp_path, recipe(micro_batch=8, steps=2), val=False, spec=resnet)
    capfd.readouterr()
    train(tmp_path, recipe(micro_batch=4, steps=2), val=False, spec=resnet)
    assert "restored the finished run" not in capfd.readouterr().err
