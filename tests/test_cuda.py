"""What only a real GPU can show: a training step captured in a CUDA graph (no host
synchronisation in the batch-hard or loss-family forward or backward), the launch count of a small batch,
the loss family's paths above B = 1024 (shared memory beyond 48 KiB),
and the stateful modules (CenterLoss, CrossBatchMemory) on CUDA tensors. Skipped visibly
without a GPU; `make gpu-check` runs them. (tripletops.distributed on CUDA tensors:
test_distributed.py.)"""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops._ext import _op_covers

from conftest import assert_close_rel, assert_grad_close, make_batch

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _op_covers("batch_hard_loss", "cuda")),
                                reason="needs a CUDA GPU and the CUDA batch_hard_loss kernel")


def _replays_match_eager_steps(loss_fn, b: int, copies: bool = False) -> None:
    """A training step of loss_fn(embeddings, labels) captured in a CUDA graph (capture
    fails on any host synchronisation); replays on new batches (with `copies`, rows
    100..149 repeat rows 0..49) must match an eager step."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16).cuda()
    x, y = make_batch(b, 32, 10, device="cuda")

    def step():
        lin.zero_grad(set_to_none=False)
        loss = loss_fn(lin(x), y)
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
        if copies:
            new_x[100:150] = new_x[:50]
        x.copy_(new_x), y.copy_(new_y)
        graph.replay()
        torch.cuda.synchronize()
        replay_loss, replay_grad = captured_loss.clone(), lin.weight.grad.clone()
        eager_loss = step()
        assert_close_rel(replay_loss, eager_loss, 1e-6, "loss")
        assert_grad_close(replay_grad, lin.weight.grad, 1e-5)


@pytest.mark.parametrize("bank", [False, True])
@pytest.mark.parametrize("b", [64, 2000])
def test_training_step_captures_in_a_cuda_graph(bank, b):
    """Forward + backward of batch_hard_loss, alone or against a bank, in a CUDA graph."""
    ref_x, ref_y = make_batch(3000, 16, 10, device="cuda", seed=7)
    kw = dict(ref_embeddings=ref_x, ref_labels=ref_y) if bank else {}
    _replays_match_eager_steps(lambda e, y: tripletops.batch_hard_loss(e, y, **kw), b)


FAMILY_STEPS = {
    "batch_all": lambda e, y: tripletops.batch_all_loss(e, y),
    "batch_all_soft": lambda e, y: tripletops.batch_all_loss(e, y, soft_margin=True),
    "semi_hard": lambda e, y: tripletops.semi_hard_loss(e, y),
    "contrastive": lambda e, y: tripletops.contrastive_loss(e, y),
    "contrastive_none": lambda e, y: tripletops.contrastive_loss(e, y, reduction="none").sum(),
    "pairwise_distance": lambda e, y: tripletops.pairwise_distance(e).sum(),
}


@pytest.mark.parametrize("b", [300, 1500])  # the family's fused path; rows sorted in shared memory
@pytest.mark.parametrize("loss", list(FAMILY_STEPS))
def test_family_step_captures_in_a_cuda_graph(loss, b):
    """The loss family and pairwise_distance (identical rows settled on the device) never
    synchronise with the host either, duplicated rows included."""
    _replays_match_eager_steps(FAMILY_STEPS[loss], b, copies=True)


@pytest.mark.parametrize("name", ["batch_all", "semi_hard", "contrastive"])
@pytest.mark.parametrize("b", [300, 1500, 5000])
def test_family_paths_match_the_cpu_kernels(name, b):
    """Each CUDA path of the family (B = 300: fused; 1500: rows sorted in 40 KiB of shared
    memory, contrastive's general path; 5000: 160 KiB, opted in past 48 KiB) gives the CPU
    kernels' loss and gradient, in float64."""
    fn = {"batch_all": tripletops.batch_all_loss, "semi_hard": tripletops.semi_hard_loss,
          "contrastive": tripletops.contrastive_loss}[name]
    x, y = make_batch(b, 16, max(2, b // 40), dtype=torch.float64, device="cuda")
    got, want = [], []
    for device, out in (("cuda", got), ("cpu", want)):
        leaf = x.to(device).clone().requires_grad_(True)
        loss = fn(leaf, y.to(device))
        loss.backward()
        out += [loss.detach().cpu(), leaf.grad.cpu()]
    assert_close_rel(got[0], want[0], 1e-10, "loss")
    assert_grad_close(got[1], want[1], 1e-9)


def test_family_small_batch_launches_at_most_six_kernels():
    """The fused path, fp32: forward + backward in at most 6 kernels (the distances, the
    statistics and the loss, then the statistics again and the gradient to the rows, plus
    each half's counter fill). The upstream gradient is given: autograd launches nothing."""
    x, y = make_batch(256, 128, 32, device="cuda")
    x.requires_grad_(True)
    g = torch.ones((), device="cuda")
    for fn in (tripletops.batch_all_loss, tripletops.semi_hard_loss, tripletops.contrastive_loss):
        for _ in range(2):  # warm-up
            fn(x, y).backward(g)
        x.grad = None
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(x, y).backward(g)
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        assert 0 < len(kernels) <= 6, (fn.__name__, kernels)


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


@pytest.mark.parametrize("module", ["center", "memory"])
def test_modules_keep_their_state_on_the_gpu_and_match_cpu(module):
    """CenterLoss and CrossBatchMemory on CUDA tensors: the buffers follow the first batch to
    the GPU and stay there (the memory bank is mined on the GPU), and three training batches
    give the CPU module's losses, gradients and state."""
    def make():
        return tripletops.CenterLoss(10, 16) if module == "center" else tripletops.CrossBatchMemory(48, 16)

    cpu_m, gpu_m = make(), make()
    for step in range(3):
        x, y = make_batch(32, 16, 10, seed=step)
        xc, xg = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
        loss_c, loss_g = cpu_m(xc, y), gpu_m(xg, y.cuda())
        loss_c.backward()
        loss_g.backward()
        assert loss_g.is_cuda
        assert_close_rel(loss_g, loss_c, 1e-5, f"loss at step {step}")
        assert_grad_close(xg.grad, xc.grad, 1e-4)
    cpu_buffers = dict(cpu_m.named_buffers())
    for name, buf in gpu_m.named_buffers():
        assert buf.is_cuda, name
        torch.testing.assert_close(buf.cpu(), cpu_buffers[name], rtol=1e-5, atol=1e-6)
