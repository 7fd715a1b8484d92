"""The recipe key `deterministic`: the switches it sets and the one line for an op torch refuses."""


def test_deterministic_kernels_switch_on_and_off_and_a_refused_op_is_named():
    import torch

    from vitpipe.training.recipe import nondeterministic_op, use_deterministic_kernels

    try:
        use_deterministic_kernels(True, torch.device("cpu"))
        assert (
            torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        )
        assert torch.backends.cudnn.deterministic
    finally:
        use_deterministic_kernels(False, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    refusal = RuntimeError(
        "adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but you "
        "set 'torch.use_deterministic_algorithms(True)'."
    )
    assert nondeterministic_op(refusal) == "adaptive_avg_pool2d_backward_cuda"
    assert nondeterministic_op(RuntimeError("CUDA out of memory")) is None
