"""What only a real GPU can show: a training step captured in a CUDA graph (no host
synchronisation in the batch-hard forward or backward), and the launch count of a small
batch. Skipped visibly without a GPU; `make gpu-check` runs them."""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops._ext import _op_covers

from conftest import assert_close_rel, assert_grad_close, make_batch

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _op_covers("batch_hard_loss", "cuda")),
                                reason="needs a CUDA GPU and the CUDA batch_hard_loss kernel")


@pytest.mark.parametrize("bank", [False, True])
@pytest.mark.parametrize("b", [64, 2000])
def test_training_step_captures_in_a_cuda_graph(bank, b):
    """Forward + backward of batch_hard_loss inside torch.cuda.graph: capture fails on any
    host synchronisation; replays must match an eager step on new data."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16).cuda()
    x, y = make_batch(b, 32, 10, device="cuda")
    ref_x, ref_y = make_batch(3000, 16, 10, device="cuda", seed=7)
    kw = dict(ref_embeddings=ref_x, ref_labels=ref_y) if bank else {}

    def step():
        lin.zero_grad(set_to_none=False)
        loss = tripletops.batch_hard_loss(lin(x), y, **kw)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    for seed in (1, 2):
        new_x, new_y = make_batch(b, 32, 10, device="cuda", seed=seed)
        x.copy_(new_x), y.copy_(new_y)
        graph.replay()
        torch.cuda.synchronize()
        replay_loss, replay_grad = captured_loss.clone(), lin.weight.grad.clone()
        eager_loss = step()
        assert_close_rel(replay_loss, eager_loss, 1e-6, "loss")
        assert_grad_close(replay_grad, lin.weight.grad, 1e-5)


def test_small_batch_launches_at_most_four_kernels():
    """B <= 1024, fp32: forward + backward in at most 4 kernel launches (row preparation,
    one GEMM, mining with the loss, the backward). The upstream gradient is given and
    x.grad starts empty, so autograd itself launches nothing."""
    x, y = make_batch(256, 128, 32, device="cuda")
    x.requires_grad_(True)
    g = torch.ones((), device="cuda")
    for _ in range(2):  # warm-up (cuBLAS handles, the allocator)
        tripletops.batch_hard_loss(x, y).backward(g)
    x.grad = None
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        tripletops.batch_hard_loss(x, y).backward(g)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert 0 < len(kernels) <= 4, kernels
