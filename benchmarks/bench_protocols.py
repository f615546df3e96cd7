"""The evaluation protocols against their floor and the tools in use, side by side:

    make bench-protocols     # or: python benchmarks/bench_protocols.py [--readme docs/protocols.md]

- re-ID at the Market-1501 sizes (Q = 3,368, G = 15,913, D = 2,048): `tripletops.reid_metrics`
  against one Q×Gᵀ GEMM (its floor) and against fast-reid's path (the torch distance
  matrix, then fast-reid's own Python `eval_market1501`, argsort per row).
- verification, N = 10,000, D = 512, TAR at FAR 1e-6 … 1e-2: `tripletops.verification_metrics`
  against one N×Nᵀ GEMM.

Synthetic embeddings with identity structure (identity centres plus noise, noise chosen so
that mAP is ~0.7: the ranks of the hardest matches are deep, which is the costly case).
Each case runs `--repeats` times in turn (interleaved); the median is reported. On CUDA
(when present) the same rows run on the GPU; a model of that run is in docs/protocols.md.
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

import tripletops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fastreid_eval():
    path = importlib.metadata.distribution("fastreid").locate_file("fastreid/evaluation/rank.py")
    spec = importlib.util.spec_from_file_location("_fastreid_rank", str(path))
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module.eval_market1501


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def reid_case(device, Q=3368, G=15913, D=2048, ids=1501, noise=3.0):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(ids, D, generator=g)
    gid, qid = torch.randint(0, ids, (G,), generator=g), torch.randint(0, ids, (Q,), generator=g)
    gcam, qcam = torch.randint(0, 6, (G,), generator=g), torch.randint(0, 6, (Q,), generator=g)
    q = (centres[qid] + noise * torch.randn(Q, D, generator=g)).to(device)
    ga = (centres[gid] + noise * torch.randn(G, D, generator=g)).to(device)
    qid, qcam, gid, gcam = (t.to(device) for t in (qid, qcam, gid, gcam))
    result = {}

    def ours():
        result["ours"] = tripletops.reid_metrics(q, qid, qcam, ga, gid, gcam)

    def gemm():
        q @ ga.T

    try:
        ev = fastreid_eval()
    except importlib.metadata.PackageNotFoundError:  # the GPU machine has no network: fast-reid may be absent
        return {"reid_metrics": ours, "one Q×Gᵀ GEMM": gemm}, result, f"Q={Q}, G={G}, D={D}"

    def fastreid():
        # fast-reid's compute_distance_matrix (euclidean): |q|² + |g|² − 2 q·g, then its eval.
        dist = (q.pow(2).sum(1, keepdim=True) + ga.pow(2).sum(1)[None, :]).addmm_(q, ga.T, alpha=-2)
        cmc, ap, inp = ev(dist.cpu().numpy(), qid.cpu().numpy(), gid.cpu().numpy(), qcam.cpu().numpy(),
                          gcam.cpu().numpy(), 50)
        result["fastreid"] = (float(sum(ap) / len(ap)), float(sum(inp) / len(inp)))

    return {"reid_metrics": ours, "one Q×Gᵀ GEMM": gemm, "fast-reid (distance matrix + eval_market1501)": fastreid}, \
        result, f"Q={Q}, G={G}, D={D}"


def verification_case(device, N=10000, D=512, classes=2000):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, classes, (N,), generator=g)
    x = (torch.randn(classes, D, generator=g)[y] + 1.0 * torch.randn(N, D, generator=g)).to(device)
    y = y.to(device)
    result = {}

    def ours():
        result["ours"] = tripletops.verification_metrics(x, y)

    def gemm():
        x @ x.T

    return {"verification_metrics": ours, "one N×Nᵀ GEMM": gemm}, result, f"N={N}, D={D}"


def run(case, device, repeats):
    fns, result, size = case(device)
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        if name.startswith("fast-reid") and repeats > 1:
            continue
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if name.startswith("fast-reid") and times[name]:
                continue  # once is enough: it takes tens of seconds
            times[name].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}, result, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--readme", help="rewrite the marked section of this markdown file")
    args = ap.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    lines = []
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU, " \
            f"{torch.get_num_threads()} threads"
        lines.append(f"**{name}** (commit {commit}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}): "
                     "median wall time of each case, side by side in one process.\n")
        lines.append("| case | size | time | ratio to the GEMM |")
        lines.append("| --- | --- | --- | --- |")
        for case in (reid_case, verification_case):
            times, result, size = run(case, device, args.repeats)
            floor = [v for k, v in times.items() if "GEMM" in k][0]
            for k, v in times.items():
                lines.append(f"| {k} | {size} | {v:.2f} s | {v / floor:.2f}× |")
            if "fast-reid (distance matrix + eval_market1501)" in times:
                ours = result["ours"]
                lines.append(f"| (mAP, mINP: tripletops {ours['mAP']:.6f}, {ours['mINP']:.6f}; fast-reid "
                             f"{result['fastreid'][0]:.6f}, {result['fastreid'][1]:.6f}) | | | |")
                fr = times["fast-reid (distance matrix + eval_market1501)"]
                lines.append(f"\n- reid_metrics: {times['reid_metrics'] / floor:.2f}× one GEMM (target ≤ 1.5×), "
                             f"{fr / times['reid_metrics']:.1f}× faster than fast-reid's path (target ≥ 10×)\n")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.readme:
        path = os.path.join(ROOT, args.readme)
        doc = open(path).read()
        begin, end = "<!-- protocols:begin -->", "<!-- protocols:end -->"
        i, j = doc.index(begin) + len(begin), doc.index(end)
        open(path, "w").write(doc[:i] + "\n" + text + "\n" + doc[j:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
