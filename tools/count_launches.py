"""How many GPU launches each op's CUDA path makes per forward + backward, counted without
a GPU: the CUDA launchers run under the SIMT emulator (make cuda-emu's library), which
records every kernel launch (TRIPLETOPS_EMU_LAUNCH_TRACE), and torch.profiler records the
ATen ops the launchers call around them; each ATen op that does arithmetic or copies is
one launch on a GPU (views, empty tensors and metadata are none).

    python tools/count_launches.py            # needs build/cuda_emu/libtripletops_emu.so

Approximate where ATen's CUDA op takes several kernels: at::sort (cub's radix sort: ~4
per call; counted as 1 here), and at::mm (cuBLAS: usually 1). A GPU profile
(benchmarks/gpu_targets.py --profile) gives the exact count.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIB = os.path.join(ROOT, "build", "cuda_emu", "libtripletops_emu.so")

# ATen ops that launch nothing on a GPU (views, allocation, metadata).
NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view", "aten::as_strided",
    "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::permute", "aten::expand",
    "aten::narrow", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias",
    "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous", "aten::to", "aten::result_type",
    "aten::resize_", "aten::set_", "aten::view_as", "aten::expand_as", "aten::numpy_T", "aten::split", "aten::unbind",
    "aten::chunk", "aten::_to_copy", "aten::clone", "aten::zeros", "aten::zeros_like", "aten::full", "aten::ones",
    "aten::ones_like", "aten::empty_permuted", "aten::new_empty", "aten::new_empty_strided", "aten::flatten",
    "aten::detach_", "aten::requires_grad_", "aten::is_nonzero",
}


def cases():
    import torch

    import tripletops

    g = torch.Generator().manual_seed(0)

    def batch(b, d=128):
        x = torch.randn(b, d, generator=g)
        y = torch.randint(0, max(2, b // 8), (b,), generator=g)
        return x, y

    def fwd_bwd(fn, *inputs):
        def run():
            leaves = [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
            fn(*leaves).sum().backward()
        return run

    x, y = batch(256)
    xs, ys = batch(64)  # the family's fused path (B <= 64 under the emulator, B <= 1024 on a GPU)
    xm, ym = batch(100)  # rows sorted in shared memory (B <= 128 under the emulator, B <= 8192 on a GPU)
    xb, yb = batch(2000, 64)
    bank, bank_y = batch(5000, 64)
    a, p, n = (torch.randn(512, 128, generator=g) for _ in range(3))
    return {
        "batch_hard_loss B=256 D=128": fwd_bwd(lambda e: tripletops.batch_hard_loss(e, y), x),
        "batch_hard_loss B=2000 D=64 (tiled)": fwd_bwd(lambda e: tripletops.batch_hard_loss(e, yb), xb),
        "batch_hard_loss B=2000 vs bank 5000": fwd_bwd(
            lambda e: tripletops.batch_hard_loss(e, yb, ref_embeddings=bank, ref_labels=bank_y), xb),
        "batch_all_loss (fused)": fwd_bwd(lambda e: tripletops.batch_all_loss(e, ys), xs),
        "batch_all_loss cosine (fused)": fwd_bwd(lambda e: tripletops.batch_all_loss(e, ys, metric="cosine"), xs),
        "semi_hard_loss (fused)": fwd_bwd(lambda e: tripletops.semi_hard_loss(e, ys), xs),
        "contrastive_loss (fused)": fwd_bwd(lambda e: tripletops.contrastive_loss(e, ys), xs),
        "batch_all_loss (shared sort)": fwd_bwd(lambda e: tripletops.batch_all_loss(e, ym), xm),
        "semi_hard_loss (shared sort)": fwd_bwd(lambda e: tripletops.semi_hard_loss(e, ym), xm),
        "batch_all_loss B=256 (general)": fwd_bwd(lambda e: tripletops.batch_all_loss(e, y), x),
        "semi_hard_loss B=256 (general)": fwd_bwd(lambda e: tripletops.semi_hard_loss(e, y), x),
        "contrastive_loss B=256 (general)": fwd_bwd(lambda e: tripletops.contrastive_loss(e, y), x),
        "contrastive_loss none (fused)": fwd_bwd(lambda e: tripletops.contrastive_loss(e, ys, reduction="none"),
                                               xs),
        "pairwise_distance 256x128": fwd_bwd(lambda e: tripletops.pairwise_distance(e), x),
        "triplet_margin_loss N=512": fwd_bwd(lambda *t: tripletops.triplet_margin_loss(*t), a, p, n),
    }


def count() -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import tripletops._ext as ext
    from tripletops import _ops

    torch.ops.load_library(LIB)
    _ops._register("tripletops_emu")
    trace = os.environ["TRIPLETOPS_EMU_LAUNCH_TRACE"]
    print(f"{'op (forward + backward)':40s} {'kernels':>8s} {'ATen':>6s} {'total':>6s}  ATen ops")
    with ext.emulated_cuda():
        for name, run in cases().items():
            run()  # warm-up (first-call setup)
            open(trace, "w").close()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            kernels = sum(1 for _ in open(trace))
            aten = collections.Counter()

            def launches(e) -> bool:  # counts e when it launches and none of its descendants do
                below = [launches(c) for c in e.cpu_children]  # (every child visited once)
                if any(below):
                    return True
                if e.name.startswith("aten::") and e.name not in NO_KERNEL:
                    aten[e.name] += 1
                    return True
                return False

            for e in prof.events():
                if e.cpu_parent is None:
                    launches(e)
            n_aten = sum(aten.values())
            top = ", ".join(f"{k[6:]}x{v}" for k, v in aten.most_common(8))
            print(f"{name:40s} {kernels:8d} {n_aten:6d} {kernels + n_aten:6d}  {top}")
    return 0


def main() -> int:
    if os.environ.get("TRIPLETOPS_EMU_LAUNCH_TRACE"):
        return count()
    if not os.path.exists(LIB):
        print(f"count_launches: {LIB} is missing: run make cuda-emu (or python tools/cuda_emu/build.py) first")
        return 1
    asan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0", TRIPLETOPS_EMU_LIB=LIB,
                   TRIPLETOPS_EMU_LAUNCH_TRACE=os.path.join(tmp, "trace.txt"),
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        return subprocess.run([sys.executable, __file__], env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
