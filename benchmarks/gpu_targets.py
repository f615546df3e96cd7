"""The GPU target rows of the open performance issues, each with its peers, side by side in
one process, inside a fixed time budget (make gpu-check's benchmark stage), and with
--profile, torch.profiler's per-kernel table of tripletops' own rows (kernel, GPU time,
launch count).

    python benchmarks/gpu_targets.py --budget 110 --out results.txt
    python benchmarks/gpu_targets.py --profile --out kernel-profile.txt

Times are medians of CUDA events around one call (forward + backward unless a row says
"fwd"), after a warm-up; "x" after a peer is that peer's time over tripletops' (> 1: we
are faster); "= N x GEMM" is tripletops' time over one GEMM of the same shape (the
floor). A row whose turn comes after the budget is spent is listed as skipped, never
left out. Batch-hard rows end with how many anchors settled on exact distances and how many
rescanned the reference set (tripletops.batch_hard._settle_stats); "model" in a row's name
is the time the kernels' comments expect on an H200 (csrc/cuda/batch_hard_cuda.cu). Needs a CUDA GPU; pytorch-metric-learning and torch.compile peers are used
when available.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tripletops  # noqa: E402
from tripletops import reference  # noqa: E402

from bench_batch_hard import eager_batch_hard  # noqa: E402
from harness import pml_or_none  # noqa: E402

MARGIN = 0.2


def event_median_ms(fn: Callable[[], object], seconds: float = 0.3, max_reps: int = 50) -> float:
    """Median CUDA-event time of fn() in ms, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times: List[float] = []
    start_wall = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start_wall < seconds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def fwd_bwd(loss_fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, backward: bool = True):
    """A callable running loss_fn on fresh leaves of the float inputs (and backward)."""
    leaves = [t.detach().requires_grad_(backward) if t.is_floating_point() else t for t in inputs]

    def call():
        for t in leaves:
            t.grad = None
        out = loss_fn(*leaves)
        if backward:
            out.sum().backward()
    return call


def batch(b: int, d: int, dtype=torch.float32, classes: Optional[int] = None, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, d, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, classes or max(2, b // 8), (b,), device="cuda", generator=g)
    return x, y


def gemm(x: torch.Tensor, other: Optional[torch.Tensor] = None):
    other = x if other is None else other
    return lambda: x @ other.T


def pml_batch_hard():
    pml = pml_or_none()
    if pml is None:
        return None
    distances, losses, miners, reducers = pml
    dist = distances.LpDistance(normalize_embeddings=False)
    miner = miners.BatchHardMiner(distance=dist)
    loss = losses.TripletMarginLoss(margin=MARGIN, distance=dist, reducer=reducers.MeanReducer())
    return lambda x, y: loss(x, y, miner(x, y))


def rows() -> Dict[str, Callable[[], Dict[str, Callable[[], object]]]]:
    """Each row: a builder returning {name: callable}; 'tripletops' first, 'gemm*' is the floor."""
    compiled_eager = torch.compile(eager_batch_hard)
    pml = pml_batch_hard()

    def batch_hard(b, d, dtype=torch.float32, peers=("eager",)):
        def build():
            x, y = batch(b, d, dtype)
            fns = {"tripletops": fwd_bwd(lambda e: tripletops.batch_hard_loss(e, y, margin=MARGIN), x)}
            if "eager" in peers:
                fns["eager"] = fwd_bwd(lambda e: eager_batch_hard(e, y), x)
            if "compile" in peers:
                fns["compile(eager)"] = fwd_bwd(lambda e: compiled_eager(e, y), x)
            if "pml" in peers and pml is not None and dtype == torch.float32:
                fns["pml"] = fwd_bwd(lambda e: pml(e, y), x)
            fns["gemm x@x.T"] = gemm(x)
            fns["_note"] = lambda: settle_note(x, y)
            return fns
        return build

    def bank():
        x, y = batch(1024, 128, classes=1000)
        g = torch.Generator(device="cuda").manual_seed(1)
        m = torch.randn(1 << 20, 128, device="cuda", generator=g)
        my = torch.randint(0, 1000, (1 << 20,), device="cuda", generator=g)

        def eager_cdist(e):  # the B x M matrix: what the fused kernel avoids
            dd = torch.cdist(e, m)
            same = y[:, None] == my[None, :]
            return torch.relu(dd.masked_fill(~same, -float("inf")).max(1).values
                              - dd.masked_fill(same, float("inf")).min(1).values + MARGIN).mean()
        return {"tripletops": fwd_bwd(lambda e: tripletops.batch_hard_loss(e, y, margin=MARGIN, ref_embeddings=m,
                                                                           ref_labels=my), x),
                "eager(cdist BxM)": fwd_bwd(eager_cdist, x), "gemm x@bank.T": gemm(x, m),
                "_note": lambda: settle_note(x, y, ref_embeddings=m, ref_labels=my)}

    def multilabel():
        x, y = batch(1024, 128)
        g = torch.Generator(device="cuda").manual_seed(2)
        hot = torch.rand(1024, 64, device="cuda", generator=g) < 2 / 64
        return {"tripletops": fwd_bwd(lambda e: tripletops.batch_hard_loss(e, hot, margin=MARGIN), x),
                "class ids": fwd_bwd(lambda e: tripletops.batch_hard_loss(e, y, margin=MARGIN), x),
                "mining multi-hot": lambda: tripletops.batch_hard_mine(x, hot),
                "mining class ids": lambda: tripletops.batch_hard_mine(x, y)}

    def family(name, b):
        ours = {"batch_all": lambda e, y: tripletops.batch_all_loss(e, y, margin=MARGIN),
                "semi_hard": lambda e, y: tripletops.semi_hard_loss(e, y, margin=1.0),
                "contrastive": lambda e, y: tripletops.contrastive_loss(e, y)}[name]
        eager = {"batch_all": lambda e, y: reference.batch_all_loss(e, y, margin=MARGIN),
                 "semi_hard": lambda e, y: reference.semi_hard_loss(e, y, margin=1.0),
                 "contrastive": lambda e, y: reference.contrastive_loss(e, y)}[name]

        def build():
            x, y = batch(b, 128)
            return {"tripletops": fwd_bwd(lambda e: ours(e, y), x), "eager": fwd_bwd(lambda e: eager(e, y), x)}
        return build

    def triplet_margin(n, backward):
        def build():
            g = torch.Generator(device="cuda").manual_seed(3)
            a, p, q = (torch.randn(n, 128, device="cuda", generator=g) for _ in range(3))
            return {"tripletops": fwd_bwd(lambda *t: tripletops.triplet_margin_loss(*t, margin=MARGIN), a, p, q,
                                          backward=backward),
                    "F.triplet_margin_loss": fwd_bwd(lambda *t: F.triplet_margin_loss(*t, margin=MARGIN), a, p, q,
                                                     backward=backward)}
        return build

    def pairwise(backward):
        def build():
            x, _ = batch(4096, 512)
            return {"tripletops": fwd_bwd(tripletops.pairwise_distance, x, backward=backward),
                    "cdist": fwd_bwd(lambda e: torch.cdist(e, e), x, backward=backward)}
        return build

    def batch_all_big():
        x, y = batch(8192, 512)
        return {"tripletops": fwd_bwd(lambda e: tripletops.batch_all_loss(e, y, margin=MARGIN), x, backward=False),
                "gemm x@x.T": gemm(x)}

    table = {
        "batch_hard fp32 B=256 D=128 (goal >= 10x eager, >= 20x pml)":
            batch_hard(256, 128, peers=("eager", "compile", "pml")),
        "batch_hard fp32 B=4096 D=512 (goal >= 4x eager, >= 3x compile; model ~0.5 ms)":
            batch_hard(4096, 512, peers=("eager", "compile", "pml")),
        "batch_hard fp32 B=8192 D=512 (goal <= 1.0x one GEMM; model ~1.05x)": batch_hard(8192, 512),
        "batch_hard bf16 B=8192 D=512 (goal <= 2.5x one GEMM, >= 10x eager; model ~2x)":
            batch_hard(8192, 512, torch.bfloat16),
        "bank fp32 B=1024 M=2^20 D=128 (goal <= 1.3x one GEMM, >= 5x eager; model ~1.3x)": bank,
        "multi-hot L=64 vs class ids B=1024 D=128 (goal <= 1.2x)": multilabel,
    }
    # The fused path (B <= 1024): 8 launches per forward + backward; model ~40 us of GPU
    # work at B = 512 (distances ~5, statistics ~10 each way, gradient ~15), so the call
    # is host-bound (~0.06-0.1 ms).
    family_goals = {("batch_all", 128): "goal <= 0.2 ms", ("semi_hard", 128): "goal <= 0.2 ms",
                    ("contrastive", 128): "goal <= 0.15 ms", ("batch_all", 512): "goal >= 15x eager",
                    ("semi_hard", 512): "goal >= 15x eager", ("contrastive", 512): "goal >= 4x eager"}
    for b in (128, 512):
        for name in ("batch_all", "semi_hard", "contrastive"):
            table[f"{name} fp32 B={b} D=128 ({family_goals[name, b]}; fused: 8 launches, model ~0.1 ms)"] = \
                family(name, b)
    table["triplet_margin N=1024 D=128 fwd (goal >= 1.0x; model: 2 launches, ~10 us)"] = triplet_margin(1024, False)
    table["triplet_margin N=65536 D=128 (goal >= 1.5x)"] = triplet_margin(65536, True)
    table["pairwise_distance 4096x512 fwd (goal >= 1.0x cdist; model ~0.5 ms)"] = pairwise(False)
    # backward: the weights kernel ~25 us, one addmm ~0.35 ms, close pairs ~40 us
    table["pairwise_distance 4096x512 (goal >= 1.0x cdist; model ~1.0 ms, ~1.5x)"] = pairwise(True)
    # the float64 GEMM ~1.4 ms, distances and settling ~0.3 ms, batch_all_stream_kernel
    # ~0.3 ms (positives sorted, each row streamed; make cuda-perf has the kernels)
    table["batch_all fp32 B=8192 D=512 fwd (goal <= 5x one GEMM; model ~1.5x)"] = batch_all_big

    def knn(Q, G, D):  # csrc/cuda/knn_cuda.cu: addmm tiles, knn_tile_select_kernel, exact ranking
        def build():
            g = torch.Generator(device="cuda").manual_seed(4)
            q, gal = torch.randn(Q, D, device="cuda", generator=g), torch.randn(G, D, device="cuda", generator=g)
            from bench_retrieval import cdist_topk, gemm as blocked_gemm
            return {"tripletops": lambda: tripletops.knn(q, gal, k=10),
                    "cdist+topk": lambda: cdist_topk(q, gal, 10, block=8192),
                    "gemm q@g.T": lambda: blocked_gemm(q, gal)}
        return build
    # the GEMMs ~52 ms, the selection's one read of 40 GB of keys ~10 ms, candidates ~2 ms
    table["knn fp32 Q=G=10^5 D=128 k=10 fwd (goal >= 3x cdist+topk, <= 1.5x one GEMM; model ~65 ms, ~1.25x)"] = \
        knn(100_000, 100_000, 128)
    # few queries: each row's tile in segments (one warp each); GEMMs ~5.5 ms, keys 4 GB ~1 ms
    table["knn fp32 Q=1024 G=2^20 D=64 k=10 fwd (model ~7 ms, ~1.3x one GEMM)"] = knn(1024, 1 << 20, 64)

    def reid():  # tripletops/protocols.py: GEMM tiles of depth 256, the epilogue in ATen ops
        def build():
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from bench_protocols import reid_case
            fns, _, _ = reid_case("cuda")
            q_g = fns["one Q×Gᵀ GEMM"]
            return {"tripletops": fns["reid_metrics"], "gemm q@g.T": q_g}
        return build
    # docs/protocols.md: the GEMM ~4 ms (TF32 off), ~210 launches, ~26 host reads: ~10 ms
    table["reid_metrics Market-1501 Q=3368 G=15913 D=2048 (goal <= 1.5x one GEMM on CPU; model ~10 ms)"] = reid()

    def verification():
        def build():
            from bench_protocols import verification_case
            fns, _, _ = verification_case("cuda")
            return {"tripletops": fns["verification_metrics"], "gemm x@x.T": fns["one N×Nᵀ GEMM"]}
        return build
    table["verification_metrics N=10^4 D=512 (no goal; a first measurement)"] = verification()
    return table


def settle_note(x: torch.Tensor, y: torch.Tensor, **kw) -> str:
    """How many anchors settled on exact distances, how many rescanned the reference set, and
    the largest "hub": the most anchors that picked one row as their positive or negative
    (the backward's ref_grad_kernel adds a row's terms in one warp's serial chain, so its
    time follows the largest group; SASS review of 2026-12-07)."""
    from tripletops.batch_hard import _settle_stats

    settled, rescanned = _settle_stats(x, y, **kw)
    m = tripletops.batch_hard_mine(x, y, **kw)
    picked = torch.cat([m.pos_idx, m.neg_idx])
    picked = picked[picked >= 0]
    hub = int(torch.bincount(picked).max()) if picked.numel() else 0
    return (f"settled {settled} ({100 * settled / len(y):.2f}%), rescanned {rescanned} of {len(y)} anchors, "
            f"largest hub {hub} anchors")


def format_row(name: str, times: Dict[str, float]) -> str:
    ours = times.get("tripletops")
    parts = []
    for impl, ms in times.items():
        if impl == "tripletops" or ours is None:
            parts.append(f"{impl}={ms:.3f}ms")
        elif impl.startswith("gemm"):
            parts.append(f"{impl}={ms:.3f}ms (tripletops = {ours / ms:.2f}x GEMM)")
        else:
            parts.append(f"{impl}={ms:.3f}ms({ms / ours:.2f}x)")
    return f"{name}: " + " ".join(parts)


def profile_rows(table, names: List[str], out) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name in names:
        fn = table[name]()["tripletops"]
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels: Dict[str, List[float]] = {}
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                kernels.setdefault(ev.name, []).append(ev.device_time_total / 1e3)
        total = sum(sum(v) for v in kernels.values())
        print(f"## {name}: {sum(len(v) for v in kernels.values())} kernels/copies, {total:.3f} ms GPU", file=out)
        for kname, ts in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {sum(ts):8.3f} ms  x{len(ts):<4} {kname[:110]}", file=out)
        model_beside(name, kernels, total, out)
        out.flush()


def _kernel_key(name: str) -> str:
    """A profiled kernel's name as tools/cuda_perf.py's models name it: tripletops' kernels
    by their base name, every GEMM kernel (cuBLAS, CUTLASS) as "GEMM", the rest "other"."""
    m = re.search(r"(\w+_kernel)\b", name)
    if m and "tripletops" in name:
        return m.group(1)
    low = name.lower()
    if "gemm" in low or "xmma" in low or "cutlass" in low:
        return "GEMM"
    return "other"


def model_beside(name: str, kernels: Dict[str, List[float]], total_ms: float, out) -> None:
    """Each measured kernel time beside tools/cuda_perf.py's model of it, with the ratio:
    the first GPU minute shows where the model is wrong."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import cuda_perf

    row = next((r for r in cuda_perf.target_rows() if name.startswith(r.name + " (")), None)
    if row is None:
        return
    res = cuda_perf.resources(compile_if_stale=False)
    modelled: Dict[str, float] = {}
    for launch in row.launches:
        key = launch.kernel if not launch.library else ("GEMM" if "GEMM" in launch.kernel or "addmm" in
                                                        launch.kernel else "other")
        modelled[key] = modelled.get(key, 0.0) + launch.seconds(res) * 1e3
    measured: Dict[str, float] = {}
    for kname, ts in kernels.items():
        k = _kernel_key(kname)
        measured[k] = measured.get(k, 0.0) + sum(ts)
    model_total = sum(modelled.values())
    print(f"  model (tools/cuda_perf.py) against measured, ms: total {model_total:.3f} modelled, "
          f"{total_ms:.3f} measured ({total_ms / model_total:.2f}x the model)", file=out)
    for k in sorted(set(modelled) | set(measured), key=lambda k: -measured.get(k, 0.0)):
        mo, me = modelled.get(k), measured.get(k)
        ratio = f"{me / mo:.2f}x" if mo and me else "-"
        print(f"    {k:<28} model {mo if mo is not None else float('nan'):8.3f}  measured "
              f"{me if me is not None else float('nan'):8.3f}  measured/model {ratio}", file=out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=110.0, help="seconds for all rows; later rows are skipped")
    ap.add_argument("--profile", action="store_true", help="per-kernel tables of tripletops' rows instead")
    ap.add_argument("--out", help="also write the lines to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_targets: no CUDA GPU")
        return 1
    out_file = open(args.out, "w") if args.out else None

    class Tee:
        def write(self, s):
            sys.stdout.write(s)
            if out_file:
                out_file.write(s)

        def flush(self):
            sys.stdout.flush()
            if out_file:
                out_file.flush()

    out = Tee()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} CUDA {torch.version.cuda} "
          f"tripletops cuda_code={' '.join(tripletops.extension_available().cuda_code)}", file=out)
    table = rows()
    if args.profile:
        profile_rows(table, [n for n in table if n.startswith(("batch_hard", "bank", "batch_all fp32 B=512",
                                                               "batch_all fp32 B=8192",
                                                               "semi_hard fp32 B=512", "contrastive fp32 B=512",
                                                               "pairwise_distance 4096x512 (goal", "knn"))], out)
        return 0
    start = time.perf_counter()
    failures = 0
    for name, build in table.items():
        if time.perf_counter() - start > args.budget:
            print(f"{name}: skipped (the {args.budget:.0f} s budget is spent)", file=out)
            continue
        try:
            fns = build()
            note = fns.pop("_note", None)
            times = {impl: event_median_ms(fn) for impl, fn in fns.items()}
            print(format_row(name, times) + (f" | {note()}" if note else ""), file=out)
        except Exception as exc:  # one row's failure (out of memory, a compile error) does not stop the rest
            failures += 1
            print(f"{name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=out)
        out.flush()
        torch.cuda.empty_cache()
    print(f"gpu_targets: {len(table)} rows in {time.perf_counter() - start:.0f} s, {failures} failed", file=out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
