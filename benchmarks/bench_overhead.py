"""The fixed cost of one loss call: forward + backward of every tripletops loss through its
public function, next to the floor any differentiable loss pays, one autograd GEMM
(`(x @ x.T).sum()` forward + backward), and to the eager batch-hard recipe users write.

    make bench-overhead     # or: python benchmarks/bench_overhead.py [--readme docs/performance.md]

At small batches the kernels take a few microseconds, so what surrounds them (argument
checks, the dispatcher, the autograd node, allocations) is the cost. Every case runs in
this one process on the same inputs; rounds of all cases are interleaved, so a slow
stretch of the machine hits them all alike, and each case's figure is its median over
rounds of the per-call mean. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

import tripletops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_batch_hard import eager_batch_hard  # noqa: E402

SIZES = [(8, 8), (32, 128), (256, 128)]  # (B, D); the issue-11 targets are B=8 and B=256
TARGET_FLOOR_RATIO = 1.3   # at B = 8: every loss within 1.3x the autograd-GEMM floor
TARGET_BATCH_HARD_RATIO = 1.15  # at B = 8: batch_hard_loss within 1.15x it (issue 39)
TARGET_EAGER_SPEEDUP = 5.0  # at B = 256, D = 128: batch-hard >= 5x the eager recipe


def cases(b: int, d: int) -> Dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).requires_grad_(True)
    y = torch.arange(b) // 4  # classes of four
    a, p, n = (torch.randn(b, d, generator=g).requires_grad_(True) for _ in range(3))

    def step(loss_fn):
        def run():
            loss_fn().backward()
        return run

    return {
        "floor: (x @ x.T).sum()": step(lambda: (x @ x.T).sum()),
        "batch_hard_loss": step(lambda: tripletops.batch_hard_loss(x, y)),
        "batch_all_loss": step(lambda: tripletops.batch_all_loss(x, y)),
        "semi_hard_loss": step(lambda: tripletops.semi_hard_loss(x, y)),
        "contrastive_loss": step(lambda: tripletops.contrastive_loss(x, y)),
        "triplet_margin_loss": step(lambda: tripletops.triplet_margin_loss(a, p, n)),
        "eager batch-hard recipe": step(lambda: eager_batch_hard(x, y)),
    }


def measure(fns: Dict[str, Callable[[], None]], seconds: float) -> Dict[str, float]:
    """Median over interleaved rounds of each case's mean time per call, in seconds."""
    calls = {}
    for name, fn in fns.items():  # warm up, and size each round to ~10 ms
        for _ in range(20):
            fn()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        calls[name] = max(1, int(0.01 / ((time.perf_counter() - t0) / 20)))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(len(s) for s in samples.values()) < 5:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def report(results: Dict[Tuple[int, int], Dict[str, float]]) -> str:
    sizes = list(results)
    names = list(next(iter(results.values())))
    head = "| forward + backward | " + " | ".join(f"B={b}, D={d}" for b, d in sizes) + " |"
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=root).stdout.strip() or "unknown"
    lines = [
        f"**Fixed cost of one call** (commit {commit}, {time.strftime('%Y-%m-%d')}; "
        f"{harness.describe_device('cpu')}; torch {torch.__version__}): "
        "forward + backward through the public function, median µs per call, and the ratio to "
        "the floor (one autograd GEMM, `(x @ x.T).sum()` forward + backward) measured beside it "
        "(`benchmarks/bench_overhead.py`).",
        "",
        head,
        "|" + "---|" * (len(sizes) + 1),
    ]
    for name in names:
        cells = []
        for size in sizes:
            t, floor = results[size][name], results[size]["floor: (x @ x.T).sum()"]
            cells.append(f"{t * 1e6:.1f} µs ({t / floor:.2f}×)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    verdicts = []
    if (8, 8) in results:
        r = results[(8, 8)]
        floor = r["floor: (x @ x.T).sum()"]
        worst = max((k for k in r if k.endswith("_loss")), key=lambda k: r[k])
        ok = r[worst] / floor <= TARGET_FLOOR_RATIO
        verdicts.append(f"B=8, D=8: the slowest loss ({worst}) costs {r[worst] / floor:.2f}× the floor "
                        f"(target ≤ {TARGET_FLOOR_RATIO}×: {'met' if ok else 'MISSED'})")
        bh = r["batch_hard_loss"] / floor
        verdicts.append(f"B=8, D=8: batch_hard_loss costs {bh:.2f}× the floor "
                        f"(target ≤ {TARGET_BATCH_HARD_RATIO}×: {'met' if bh <= TARGET_BATCH_HARD_RATIO else 'MISSED'})")
    if (256, 128) in results:
        r = results[(256, 128)]
        speedup = r["eager batch-hard recipe"] / r["batch_hard_loss"]
        ok = speedup >= TARGET_EAGER_SPEEDUP
        verdicts.append(f"B=256, D=128: batch_hard_loss is {speedup:.1f}× faster than the eager recipe "
                        f"(target ≥ {TARGET_EAGER_SPEEDUP}×: {'met' if ok else 'MISSED'})")
    lines += [f"- {v}" for v in verdicts]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring time per size")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "overhead_cpu.md"))
    ap.add_argument("--readme", help="replace the overhead section of this README with the table")
    args = ap.parse_args()
    results = {}
    for b, d in SIZES:
        results[(b, d)] = measure(cases(b, d), args.seconds)
    text = report(results)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    if args.readme:
        harness.replace_section(args.readme, "overhead", text)


if __name__ == "__main__":
    main()
