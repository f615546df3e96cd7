"""One forward + backward of every op on each of its CUDA paths, at the smallest sizes that
reach them: the program compute-sanitizer (memcheck, racecheck, synccheck, initcheck)
runs in make gpu-check, instead of the test suite (which takes minutes under a sanitizer).

Paths (csrc/cuda/batch_hard_cuda.cu's constants on a GPU: kSmallMaxB 1024, kSelfTileRows
4096, kSelfScanMaxB 1024, kTileElems 2^25, kRowChunk 2048, kColumnChunk 256): small
self-mining (one GEMM + one kernel), tiled self-mining (B = 4200: an off-diagonal tile
whose columns are mined in 16 row ranges), the sorted backward above B = 1024, a
reference set of several tiles each split over many state slots, multi-hot labels, fp64 /
fp32 / fp16 / bf16 (halves on the tensor-core GEMM), data far from the origin, near ties
settled from the kept candidates, duplicated rows that rescan the reference set, and
every other op (pairwise_distance, triplet_margin_loss with
swap, batch_all, semi_hard, contrastive: the fused path of B <= 1024, and above it the rows
sorted in shared memory). Each case checks that its results are finite
where they must be. Exit 0 when every case ran.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/gpu_sanitize_driver.py
"""
from __future__ import annotations

import sys
import time

import torch

import tripletops


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def run_cases(device: str = "cuda", scale: int = 1) -> list:
    """The cases, on `device`; scale < 1 shrinks nothing (the paths need their sizes) but
    the CPU self-test of this driver passes device="cpu"."""
    g = torch.Generator(device=device).manual_seed(0)
    done = []

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    def labels(n, classes):
        return torch.randint(0, classes, (n,), device=device, generator=g)

    def case(name, fn):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        done.append(name)
        print(f"  {name}: ok ({time.perf_counter() - start:.1f} s)", flush=True)

    def batch_hard(x, y, **kw):
        e = _leaf(x)
        ref = kw.pop("ref", None)
        if ref is not None:
            r = _leaf(ref[0])
            kw.update(ref_embeddings=r, ref_labels=ref[1])
        loss = tripletops.batch_hard_loss(e, y, margin=0.2, **kw)
        loss.sum().backward()
        assert torch.isfinite(e.grad).all()
        tripletops.batch_hard_mine(x, y, **{k: v for k, v in kw.items() if k in ("ref_embeddings", "ref_labels",
                                                                              "metric")})

    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        case(f"batch_hard small self-mining B=200 {tag}", lambda: batch_hard(randn(200, 24, dtype=dtype),
                                                                           labels(200, 20)))
    for metric in ("euclidean", "sqeuclidean", "cosine"):
        case(f"batch_hard tiled self-mining B=1500 {metric}",
             lambda: batch_hard(randn(1500, 16), labels(1500, 50), metric=metric))
    case("batch_hard tiled self-mining with column ranges B=4200",
         lambda: batch_hard(randn(4200, 8), labels(4200, 300)))
    case("batch_hard bank of 3 tiles M=250000", lambda: batch_hard(randn(300, 8), labels(300, 40),
                                                                   ref=(randn(250000, 8), labels(250000, 40))))
    case("batch_hard bank bf16 M=20000", lambda: batch_hard(randn(100, 8, dtype=torch.bfloat16), labels(100, 10),
                                                           ref=(randn(20000, 8, dtype=torch.bfloat16),
                                                                labels(20000, 10))))
    hot = torch.rand(1500, 70, device=device, generator=g) < 0.05
    case("batch_hard multi-hot L=70 B=1500", lambda: batch_hard(randn(1500, 16), hot))
    case("batch_hard multi-hot bank", lambda: batch_hard(randn(200, 16), hot[:200],
                                                         ref=(randn(1500, 16), hot)))
    case("batch_hard far from the origin", lambda: batch_hard(randn(1500, 16) * 0.01 + 1000, labels(1500, 50)))
    base = randn(40, 16)
    dup = base[torch.randint(0, 40, (1200,), device=device, generator=g)] * 3  # exact ties: the settling kernels
    case("batch_hard duplicated rows (settling)", lambda: batch_hard(dup, labels(1200, 6)))

    def pairwise():
        for metric in ("euclidean", "sqeuclidean", "cosine"):
            x, y = _leaf(randn(300, 33)), _leaf(randn(170, 33))
            (tripletops.pairwise_distance(x, y, metric=metric).sum() + tripletops.pairwise_distance(
                x, metric=metric).sum()).backward()
            assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    case("pairwise_distance, every metric", pairwise)

    def triplets():
        a, p, n = (_leaf(randn(500, 24)) for _ in range(3))
        for swap in (False, True):
            tripletops.triplet_margin_loss(a, p, n, margin=0.3, swap=swap).backward()
    case("triplet_margin_loss (swap too)", triplets)

    def family():
        for b, dtype in ((130, torch.float32), (300, torch.float64), (64, torch.bfloat16)):
            y = labels(b, 9)
            for fn in (lambda e: tripletops.batch_all_loss(e, y, margin=0.2),
                       lambda e: tripletops.batch_all_loss(e, y, margin=0.2, soft_margin=True),
                       lambda e: tripletops.semi_hard_loss(e, y, margin=0.5),
                       lambda e: tripletops.contrastive_loss(e, y),
                       lambda e: tripletops.contrastive_loss(e, y, reduction="none")):
                e = _leaf(randn(b, 20, dtype=dtype))
                fn(e).sum().backward()
                assert torch.isfinite(e.grad).all()
    case("batch_all / semi_hard / contrastive", family)

    def family_shared_sort():  # B > 1024: rows sorted in shared memory (2048 entries, 40 KiB)
        for b in (1030,):  # (the opted-in sizes, past 48 KiB, are too slow under racecheck: tests/test_cuda.py)
            y = labels(b, 9)
            for fn in (lambda e: tripletops.batch_all_loss(e, y, margin=0.2),
                       lambda e: tripletops.semi_hard_loss(e, y, margin=0.5)):
                e = _leaf(randn(b, 20))
                fn(e).backward()
                assert torch.isfinite(e.grad).all()
    case("batch_all / semi_hard, rows sorted in shared memory", family_shared_sort)

    def knn():  # the tile selection (row segments), the topk path (k > 256), the exact keys, a NaN query
        for metric in ("euclidean", "sqeuclidean", "cosine"):
            q, g = randn(700, 24), randn(3000, 24)
            q[5, 3] = float("nan")
            for k in (10, 100, 300):
                nb = tripletops.knn(q, g, k=k, metric=metric)
                assert (nb.idx >= 0).all()
            nb = tripletops.knn(randn(900, 16, dtype=torch.float64), k=7, metric=metric)
            assert (nb.idx >= 0).all()
    case("knn, every metric, a gallery and self-search", knn)
    return done


def main() -> int:
    if not torch.cuda.is_available() or "cuda" not in tripletops.extension_available().devices:
        print("gpu_sanitize_driver: needs a CUDA GPU and tripletops' CUDA kernels")
        return 1
    start = time.perf_counter()
    done = run_cases("cuda")
    print(f"gpu_sanitize_driver: {len(done)} cases in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
