"""The memory contract (README, "Mining fused with the loss"): a batch of 1024 against a bank of 2^20 embeddings, no B x M matrix."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import resource, torch, tripletops
B, M, D = 1024, 1 << 20, 64
g = torch.Generator().manual_seed(0)
bank = torch.randn(M, D, generator=g)
bank_y = torch.randint(0, 1000, (M,), generator=g)
x = torch.randn(B, D, generator=g, requires_grad=True)
y = torch.randint(0, 1000, (B,), generator=g)
peak_kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# Warm the allocator and the op once on a small bank so that growth below is the op's own.
tripletops.batch_hard_loss(x, y, ref_embeddings=bank[:4096], ref_labels=bank_y[:4096]).backward()
before = peak_kib()
loss = tripletops.batch_hard_loss(x, y, ref_embeddings=bank, ref_labels=bank_y)
loss.backward()
growth_mib = (peak_kib() - before) / 1024
m = tripletops.batch_hard_mine(x.detach(), y, ref_embeddings=bank, ref_labels=bank_y)
print(f"loss={loss.item():.6f} valid={int(m.valid.sum())} growth_mib={growth_mib:.1f} bxm_mib={B * M * 4 / 2**20:.0f}")
assert torch.isfinite(loss) and loss.item() > 0 and bool(m.valid.all())
assert growth_mib < 1024, growth_mib
"""


def test_bank_of_2_pow_20_stays_under_1_gib():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    print(res.stdout, res.stderr)
    assert res.returncode == 0, res.stderr
