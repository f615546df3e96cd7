"""Exact k-nearest search and retrieval metrics: tripletops.knn against faiss-cpu's exact
flat index (IndexFlatL2), torch.cdist + topk (chunked to fit), and one plain GEMM of the
same shape; tripletops.retrieval_metrics against pytorch-metric-learning's
AccuracyCalculator on the same embeddings. Peers run side by side in this one process.

    make bench-retrieval    # or: python benchmarks/bench_retrieval.py [--readme docs/performance.md]

CPU cases (issue 26): (a) Q = G = 10^4, D = 128, k = 10, a distinct gallery; (b) the same
10^4 rows against themselves; (c) Q = 1024 against G = 2^20, D = 64, k = 10; metrics over
10^4 queries. On CUDA: Q = G = 10^5, D = 128, k = 10 against cdist + topk and one GEMM.
Each figure is the minimum over a few runs (the first run is a warm-up). Not part of the
test suite.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List, Optional

import torch

import tripletops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def best_time(fn: Callable[[], object], runs: int, device: str) -> float:
    fn()
    harness.synchronize(device)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        harness.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def cdist_topk(q: torch.Tensor, g: Optional[torch.Tensor], k: int, block: int = 2048):
    """The eager recipe, chunked over queries so that it fits: cdist + topk."""
    gal = q if g is None else g
    out = []
    for q0 in range(0, q.shape[0], block):
        d = torch.cdist(q[q0:q0 + block], gal)
        if g is None:  # a query never finds itself
            d[torch.arange(d.shape[0]), torch.arange(q0, q0 + d.shape[0])] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def gemm(q: torch.Tensor, g: torch.Tensor, block: int = 8192):
    """One Q x G GEMM of the search's shape, in query blocks of at most `block` rows."""
    for q0 in range(0, q.shape[0], block):
        q[q0:q0 + block] @ g.T


def faiss_search(faiss, q: torch.Tensor, g: torch.Tensor, k: int, self_search: bool):
    index = faiss.IndexFlatL2(q.shape[1])
    index.add(g.numpy())
    return lambda: index.search(q.numpy(), k + 1 if self_search else k)


def cpu_rows(runs: int) -> List[str]:
    faiss = harness.faiss_or_none()
    rows = ["| case | tripletops.knn | faiss IndexFlatL2 | tripletops / faiss | goal | cdist + topk | one GEMM |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    g0 = torch.Generator().manual_seed(0)
    cases = [("(a) Q = G = 10⁴, D = 128, k = 10, a distinct gallery", 10_000, 10_000, 128, False, 1.0),
             ("(b) the same 10⁴ rows against themselves", 10_000, None, 128, True, 0.7),
             ("(c) Q = 1024 against G = 2²⁰, D = 64, k = 10", 1024, 1 << 20, 64, False, 0.5)]
    for name, Q, G, D, self_search, goal in cases:
        q = torch.randn(Q, D, generator=g0)
        g = None if G is None else torch.randn(G, D, generator=g0)
        gal = q if g is None else g
        r = 1 if G and G > 100_000 else runs
        t = best_time(lambda: tripletops.knn(q, g, k=10), r, "cpu")
        tf = best_time(faiss_search(faiss, q, gal, 10, self_search), r, "cpu") if faiss else float("nan")
        tc = best_time(lambda: cdist_topk(q, g, 10), r, "cpu") if G is None or G <= 100_000 else float("nan")
        tg = best_time(lambda: gemm(q, gal), r, "cpu")
        ratio = t / tf
        rows.append(f"| {name} | {t * 1e3:.0f} ms | {tf * 1e3:.0f} ms | {ratio:.2f}× | ≤ {goal}× "
                    f"{'met' if ratio <= goal else '**not met**'} | "
                    + (f"{tc * 1e3:.0f} ms" if tc == tc else "—") + f" | {tg * 1e3:.0f} ms |")
    return rows


def metric_rows(device: str, runs: int) -> List[str]:
    pml = harness.pml_or_none()
    g0 = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 100, (10_000,), generator=g0)
    x = torch.randn(10_000, 64, generator=g0) + 0.3 * torch.randn(100, 64, generator=g0)[labels]
    x, labels = x.to(device), labels.to(device)
    t = best_time(lambda: tripletops.retrieval_metrics(x, labels, k=(1, 5, 10)), runs, device)
    rows = ["| retrieval metrics, 10⁴ queries (D = 64, 100 classes), against | tripletops.retrieval_metrics | "
            "AccuracyCalculator | speedup | goal |", "| --- | --- | --- | --- | --- |"]
    if pml is None:
        return rows + [f"| | {t * 1e3:.0f} ms | not installed | — | ≥ 10× |"]
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_reciprocal_rank")
    mine = tripletops.retrieval_metrics(x, labels, k=(1,))
    # AccuracyCalculator as constructed by default (k=None: every reference row is
    # retrieved, as its docs' examples do), and with k="max_bin_count" (the depth that
    # MAP@R needs, which is what tripletops searches).
    for name, k in (("AccuracyCalculator(), default k=None", None), ('AccuracyCalculator(k="max_bin_count")',
                                                                      "max_bin_count")):
        calc = AccuracyCalculator(include=include, k=k, device=torch.device(device))
        start = time.perf_counter()  # one call: the default one retrieves 10^8 neighbours
        theirs = calc.get_accuracy(x, labels)
        harness.synchronize(device)
        tp = time.perf_counter() - start
        diff = max(abs(mine[m] - theirs[m]) for m in ("precision_at_1", "r_precision", "mean_average_precision_at_r"))
        rows.append(f"| {name}; largest difference of P@1, R-precision, MAP@R: {diff:.1e} | {t * 1e3:.0f} ms | "
                    f"{tp * 1e3:.0f} ms | {tp / t:.1f}× | ≥ 10× {'met' if tp / t >= 10 else '**not met**'} |")
        last = tp
    # The floor of any exact search of these rows against themselves: half of x x^T (the
    # symmetric tiles), measured here beside them.
    tg = best_time(lambda: x @ x.T, runs, device)
    rows += ["", f"The floor, measured in this run: one GEMM x xᵀ takes {tg * 1e3:.0f} ms, so a search that "
                 f"computes only its half takes at least ~{tg * 1e3 / 2:.0f} ms; 10× the last row's "
                 f"AccuracyCalculator is {last * 1e3 / 10:.0f} ms."]
    return rows


def cuda_rows(runs: int) -> List[str]:
    g0 = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(100_000, 128, device="cuda", generator=g0)
    g = torch.randn(100_000, 128, device="cuda", generator=g0)
    t = best_time(lambda: tripletops.knn(q, g, k=10), runs, "cuda")
    tc = best_time(lambda: cdist_topk(q, g, 10, block=8192), runs, "cuda")
    tg = best_time(lambda: gemm(q, g), runs, "cuda")
    return ["| Q = G = 10⁵, D = 128, k = 10, fp32 | tripletops.knn | cdist + topk | vs cdist + topk (goal ≥ 3×) "
            "| one GEMM | knn / GEMM (goal ≤ 1.5×) |", "| --- | --- | --- | --- | --- | --- |",
            f"| | {t * 1e3:.1f} ms | {tc * 1e3:.1f} ms | {tc / t:.1f}× | {tg * 1e3:.1f} ms | {t / tg:.2f}× |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown output (default benchmarks/results/retrieval_<device>.md)")
    ap.add_argument("--readme", help="replace the retrieval section of this README with the tables")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and "cuda" in tripletops.extension_available().devices else "cpu"
    lines = [f"Machine: {harness.describe_device(device)}; torch {torch.__version__}; "
             f"{torch.get_num_threads()} CPU threads.", ""]
    lines += (cuda_rows(args.runs) if device == "cuda" else cpu_rows(args.runs)) + [""]
    lines += metric_rows(device, args.runs)
    text = "\n".join(lines) + "\n"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"retrieval_{device}.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)
    if args.readme:
        harness.replace_section(args.readme, f"retrieval_{device}", text)


if __name__ == "__main__":
    main()
