"""One rank of the multi-process tests in test_distributed.py (not collected by pytest).

    python dist_worker.py RANK WORLD INIT_FILE OUT_DIR

With TRIPLETOPS_DIST_DEVICE=cuda the cases run on CUDA tensors (gloo, every rank on the
current GPU); results are saved on the CPU.

Builds the same global batches as the test (from fixed seeds), takes this rank's
slice, runs tripletops.distributed on every case and saves losses, gradients and
mined indices to OUT_DIR/rank<RANK>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_cases import CASES, ERROR_CASES, batch, split  # noqa: E402

import tripletops  # noqa: E402
from tripletops import distributed as tdist  # noqa: E402


def main() -> None:
    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    device = os.environ.get("TRIPLETOPS_DIST_DEVICE", "cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, case in CASES.items():
        x_all, y_all = batch(case)
        lo, hi = split(len(x_all), world)[rank]
        x = x_all[lo:hi].clone().to(device).requires_grad_(True)
        y = y_all[lo:hi].to(device)
        kw = dict(case["kwargs"])
        fn = case.get("fn", "batch_hard_loss")
        loss = getattr(tdist, fn)(x, y, **kw)
        (loss.sum() if loss.dim() else loss).backward()
        results[name] = {"loss": loss.detach().cpu(), "grad": x.grad.cpu()}
        if fn == "batch_hard_loss":
            mined = tdist.batch_hard_mine(x.detach(), y, metric=kw.get("metric", "euclidean"),
                                          normalize=kw.get("normalize", False))
            results[name].update(pos_idx=mined.pos_idx.cpu(), neg_idx=mined.neg_idx.cpu())
    # Inputs that one rank rejects, or that differ between ranks: the same ValueError on
    # every rank (recorded), never an abort or a hang.
    errors = {}
    for name, make in ERROR_CASES.items():
        for fn in ("batch_hard_loss", "batch_all_loss"):
            x, y = make(rank)
            try:
                getattr(tdist, fn)(x, y)
                errors[f"{name}/{fn}"] = None
            except ValueError as exc:
                errors[f"{name}/{fn}"] = str(exc)
    results["errors"] = errors
    # The gathered batch, with gradients back to their owners: sum of every rank's rows.
    x = torch.full((rank + 1, 3), float(rank), dtype=torch.float64, device=device, requires_grad=True)
    g = tdist.all_gather(x)
    assert g.device == x.device, (g.device, x.device)
    (g * torch.arange(1, len(g) + 1, dtype=torch.float64, device=device)[:, None]).sum().backward()
    results["all_gather"] = {"gathered": g.detach().cpu(), "grad": x.grad.cpu()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: {len(results)} cases, extension {tripletops.extension_available().loaded}")


if __name__ == "__main__":
    main()
