"""The drop-ins against the originals they replace, side by side in one process:
sentence-transformers' BatchHardTripletLoss and pytorch-metric-learning's BatchHardMiner +
TripletMarginLoss (forward + backward) and AccuracyCalculator, against
tripletops.integrations' subclasses.

    make bench-integrations   # or: python benchmarks/bench_integrations.py [--readme docs/performance.md]

Rounds of all cases of one size are interleaved (bench_overhead.measure), so a slow
stretch of the machine hits both alike; each figure is the median over rounds of the
per-call mean. CPU always, CUDA too when present. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_overhead import measure  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)


def st_cases(b: int, d: int, device: str):
    from sentence_transformers.sentence_transformer import losses as st

    from tripletops.integrations import sentence_transformers as ours

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).to(device).requires_grad_(True)
    y = (torch.arange(b) // 4).to(device)
    model = torch.nn.Identity()
    orig, drop = st.BatchHardTripletLoss(model), ours.BatchHardTripletLoss(model)

    def step(loss):
        return lambda: loss.compute_loss_from_embeddings([x], y).backward()

    return {"sentence-transformers": step(orig), "tripletops drop-in": step(drop)}


def pml_cases(b: int, d: int, device: str):
    from pytorch_metric_learning import losses, miners

    from tripletops.integrations import pml as ours

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).to(device).requires_grad_(True)
    y = (torch.arange(b) // 4).to(device)
    pairs = {"pytorch-metric-learning": (miners.BatchHardMiner(), losses.TripletMarginLoss(margin=0.2)),
             "tripletops drop-in": (ours.BatchHardMiner(), ours.TripletMarginLoss(margin=0.2))}

    def step(miner, loss):
        return lambda: loss(x, y, miner(x, y)).backward()

    return {name: step(*p) for name, p in pairs.items()}


def accuracy_cases(n: int, d: int, device: str):
    """PML's AccuracyCalculator against itself (reference = query), k="max_bin_count",
    NMI/AMI excluded (both would run the same FAISS k-means): FaissKNN against
    tripletops.knn."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from tripletops.integrations import pml as ours

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device)
    y = (torch.arange(n) % 100).to(device)
    kw = dict(k="max_bin_count", exclude=("NMI", "AMI"), device=torch.device(device))
    calcs = {"pytorch-metric-learning": AccuracyCalculator(**kw), "tripletops drop-in": ours.AccuracyCalculator(**kw)}
    return {name: (lambda c=c: c.get_accuracy(x, y)) for name, c in calcs.items()}


ROWS = [("sentence-transformers BatchHardTripletLoss", st_cases, [(64, 768), (256, 768), (1024, 768)]),
        ("PML BatchHardMiner + TripletMarginLoss", pml_cases, [(256, 128), (4096, 128)]),
        ("PML AccuracyCalculator (k=max_bin_count), 10^4 against itself", accuracy_cases, [(10000, 128)])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per size")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "integrations.md"))
    ap.add_argument("--readme", help="replace the integrations section of this file with the table")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=root).stdout.strip() or "unknown"
    import pytorch_metric_learning
    import sentence_transformers

    lines = [f"**The drop-ins against the originals** (commit {commit}, {time.strftime('%Y-%m-%d')}; torch "
             f"{torch.__version__}, sentence-transformers {sentence_transformers.__version__}, "
             f"pytorch-metric-learning {pytorch_metric_learning.__version__}): forward + backward "
             "(AccuracyCalculator: one get_accuracy), median per call, both measured side by side in one process "
             "(`benchmarks/bench_integrations.py`).", "",
             "| device | what | B, D | original | tripletops drop-in | speedup |", "|---|---|---|---|---|---|"]
    for device in harness.DEVICES:
        for what, cases, sizes in ROWS:
            for b, d in sizes:
                t = measure(cases(b, d, device), args.seconds)
                orig, drop = list(t.values())
                lines.append(f"| {harness.describe_device(device)} | {what} | {b}, {d} | {orig * 1e3:.2f} ms | "
                             f"{drop * 1e3:.2f} ms | {orig / drop:.1f}× |")
                print(lines[-1], flush=True)
    lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    if args.readme:
        harness.replace_section(args.readme, "integrations", text)


if __name__ == "__main__":
    main()
