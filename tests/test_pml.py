"""Agreement with pytorch-metric-learning's batch-hard recipe."""
from __future__ import annotations

import pytest
import torch

import tripletops

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, miners, reducers  # noqa: E402

from conftest import devices_for  # noqa: E402


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("b,d,c", [(32, 8, 8), (96, 16, 12), (200, 32, 50)])
def test_matches_pml_batch_hard(device, normalize, b, d, c):
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, d, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    dist = distances.LpDistance(normalize_embeddings=normalize, p=2, power=1)
    miner = miners.BatchHardMiner(distance=dist)
    pml_loss_fn = losses.TripletMarginLoss(margin=0.2, distance=dist, reducer=reducers.MeanReducer())
    pml_loss = pml_loss_fn(x, y, miner(x, y))
    (pml_grad,) = torch.autograd.grad(pml_loss, x)

    ours = tripletops.batch_hard_loss(x, y, margin=0.2, normalize=normalize)
    (our_grad,) = torch.autograd.grad(ours, x)
    torch.testing.assert_close(ours, pml_loss, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(our_grad, pml_grad, rtol=1e-6, atol=1e-9)

    # and the same pairs
    a, p, n = miner(x, y)  # batch-hard triplets: one (anchor, positive, negative) per valid anchor
    m = tripletops.batch_hard_mine(x, y, normalize=normalize)
    assert torch.equal(a, m.valid.nonzero().flatten())
    assert torch.equal(p, m.pos_idx[a]) and torch.equal(n, m.neg_idx[a])
