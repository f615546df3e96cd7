"""The CUDA kernels' cost models, executable: `make cuda-perf` (no GPU needed).

1. Every `__global__` kernel of csrc/cuda with its registers, shared memory and spills in
   the compiled sm_90 code (ptxas, through tools/cuda_check.py; the report of the last
   `make cuda-check` is reused when it is newer than the sources), its block size at the
   launch sites, and the blocks per SM (occupancy) that allows on an H100/H200.
2. For each benchmark target row of the H200 (benchmarks/gpu_targets.py), every kernel the
   call launches at that size: launches, grid, bytes, FLOPs, and a modelled time at the
   H200's numbers; the row's model is the sum, and it is set beside the row's goal.

The model of one launch:  launch overhead + max(bytes / bandwidth, flops / peak,
instructions / issue rate), each scaled by the SMs the grid occupies and the warps
resident on them (Launch.seconds): a memory stream needs about half the warps resident
to hide latency, an instruction stream about a quarter. Kernels whose time the
review of the compiled code (../shared/gpu/sass-review-2026-12-07.md) found bound by
something else (serial steps, barriers) say so in their note and use that count.

`--json PATH` writes {row: {kernel: modelled µs}}; `make gpu-check` prints each measured
kernel time beside it (benchmarks/gpu_targets.py). These are models: not one figure here
was measured on a GPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "build", "cuda-check", "report.txt")
SNAPSHOT = os.path.join(ROOT, "tools", "cuda_resources_sm90.json")

# The H200 (the guide's numbers; the H100's differ in bandwidth: 3.35 TB/s).
H200 = {
    "sms": 132,
    "bandwidth": 4.3e12,        # bytes/s, measured copy bandwidth
    "fp32_simt": 60e12,         # FLOP/s without tensor cores
    "fp32_gemm": 50e12,         # cuBLAS SGEMM (no TF32), the kernels' comments' figure
    "fp64_gemm": 50e12,         # DGEMM on FP64 tensor cores (67 TFLOP/s peak)
    "bf16_gemm": 790e12,        # measured bf16 GEMM
    "issue": 132 * 4 * 1.98e9,  # warp instructions per second: 4 schedulers per SM at 1.98 GHz
    "clock": 1.98e9,
    "launch_s": 3e-6,           # a launch, back to back on one stream
    "sync_s": 15e-6,            # a host read of a device value (launch latency + copy)
    "regs_per_sm": 65536,
    "threads_per_sm": 2048,
    "blocks_per_sm": 32,
    "smem_per_sm": 228 * 1024,
}

# Threads per block of every kernel, from its launch sites (constants of the .cuh files:
# kRowsPerBlock * kWarp = 256, kFamilyThreads = 128, kElementThreads = 256, ...). A
# kernel added to csrc/cuda without an entry here fails `make cuda-perf`.
THREADS = {
    # batch_hard_kernels.cuh
    "prepare_rows_kernel": 1024, "batch_hard_small_kernel": 256, "row_norms_kernel": 256, "mine_tile_kernel": 256,
    "merge_slots_kernel": 256, "settle_parts_kernel": 256, "finish_anchors_kernel": 256, "count_kernel": 256,
    "self_grad_kernel": 256, "anchor_grad_kernel": 256, "ref_grad_kernel": 256, "ref_merge_kernel": 256,
    # knn_kernels.cuh
    "knn_exact_keys_kernel": 256, "knn_refine_keys_kernel": 256, "knn_tile_select_kernel": 256,
    # loss_family_*.cuh (triplet_family_fused_kernel: sorted_row_threads(B), up to 1024)
    "family_unit_rows_kernel": 128, "family_distance_kernel": 256, "triplet_family_fused_kernel": 1024,
    "batch_all_stream_kernel": 256,
    "contrastive_fused_kernel": 128, "contrastive_terms_kernel": 256, "family_embedding_grad_kernel": 128,
    "split_by_label_kernel": 256, "row_prefix_sum_kernel": 32, "batch_all_stats_kernel": 128,
    "batch_all_grad_kernel": 128, "semi_hard_stats_kernel": 128, "semi_hard_grad_kernel": 128,
    "contrastive_stats_kernel": 128, "contrastive_pairs_kernel": 256, "family_total_kernel": 128,
    # pairwise_distance_kernels.cuh (kThreads = 256, kRowsPerBlock = 8 warps, pair_weights: 32 x 8)
    "gram_to_distance_kernel": 256, "row_hash_kernel": 256, "identical_rows_kernel": 256,
    "settle_identical_kernel": 256, "pair_weights_kernel": 256, "close_pairs_kernel": 256,
    "normalize_backward_kernel": 256,
    # triplet_margin_loss_kernels.cuh
    "triplet_forward_kernel": 256, "triplet_count_kernel": 256, "triplet_backward_kernel": 256,
}


# ----------------------------------------------------------------------------- part 1
@dataclass
class Resources:
    regs: int = 0
    smem: int = 0          # static shared memory, bytes
    spill: int = 0         # spill stores + loads, bytes
    stack: int = 0
    variants: int = 0      # template instantiations seen


def kernels_in_sources() -> List[str]:
    names = set()
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu*")):
        text = open(path).read()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)", text):
            names.add(m.group(1))
    return sorted(names)


def _demangled(mangled: str, with_args: bool = False):
    """(base name, whether it is a float64 instantiation); with_args, the name with its
    template arguments as c++filt writes them ("knn_tile_select_kernel<float, 1>")."""
    try:
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    except OSError:
        name = mangled
    m = re.search(r"(\w+)(<[^(]*>)?\(", name)
    if not m:
        return (name, False, name) if with_args else (name, False)
    double = "double" in (m.group(2) or "")
    return (m.group(1), double, m.group(1) + (m.group(2) or "")) if with_args else (m.group(1), double)


def parse_ptxas(text: str, arch: str = "sm_90") -> Dict[str, Resources]:
    """Per kernel (base name) from ptxas -v: the largest over its non-float64 template
    instantiations (the fp32/bf16 rows the targets use), or over all where every one is
    float64. Each instantiation also under its name with template arguments
    ("knn_tile_select_kernel<float, 1>"), for a row that launches that one (Launch.variant)."""
    out: Dict[str, Resources] = {}
    wide: Dict[str, Resources] = {}
    single: Dict[str, Resources] = {}
    current: Optional[Resources] = None
    one: Optional[Resources] = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = one = None
            if m.group(2) == arch:
                base, double, full = _demangled(m.group(1), with_args=True)
                current = (wide if double else out).setdefault(base, Resources())
                current.variants += 1
                if full != base:
                    one = single.setdefault(full, Resources(variants=1))
            continue
        if current is None:
            continue
        for r in (current, one):
            if r is not None:
                _take(r, line)
    for k, v in wide.items():
        out.setdefault(k, v)
    out.update(single)
    return out


def _take(r: Resources, line: str) -> None:
    """One line of ptxas -v into r (the largest of each figure seen)."""
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        r.stack = max(r.stack, int(m.group(1)))
        r.spill = max(r.spill, int(m.group(2)) + int(m.group(3)))
    m = re.search(r"Used (\d+) registers", line)
    if m:
        r.regs = max(r.regs, int(m.group(1)))
        s = re.search(r"(\d+) bytes smem", line)
        if s:
            r.smem = max(r.smem, int(s.group(1)))


def resources(compile_if_stale: bool) -> Dict[str, Resources]:
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.*")) + glob.glob(os.path.join(ROOT, "csrc", "*.h"))
    newest = max(os.path.getmtime(s) for s in sources)
    if os.path.exists(REPORT) and os.path.getmtime(REPORT) >= newest:
        found = parse_ptxas(open(REPORT).read())
        if found:
            return found
    if compile_if_stale and _nvcc():
        print("cuda-perf: compiling for sm_90 (tools/cuda_check.py) ...", flush=True)
        os.makedirs(os.path.dirname(REPORT), exist_ok=True)
        env = dict(os.environ, TRIPLETOPS_CUDA_ARCHS="90")
        res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_check.py")], capture_output=True,
                             text=True, env=env)
        open(REPORT, "w").write(res.stdout + res.stderr)
        found = parse_ptxas(res.stdout + res.stderr)
        if found:
            return found
    print(f"cuda-perf: no current ptxas report; using the committed snapshot {os.path.relpath(SNAPSHOT, ROOT)}")
    snap = json.load(open(SNAPSHOT))
    return {k: Resources(**v) for k, v in snap.items()}


def _nvcc() -> bool:
    import shutil

    return bool(shutil.which("nvcc")) or os.path.exists(os.path.join(os.getenv("CUDA_HOME", "/usr/local/cuda"),
                                                                      "bin", "nvcc"))


def blocks_per_sm(r: Resources, threads: int, gpu=H200) -> Dict[str, int]:
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(r.regs, 1) * 32 / 256) * 256
    by_regs = (gpu["regs_per_sm"] // regs_per_warp) // warps
    by_threads = gpu["threads_per_sm"] // threads
    by_smem = gpu["smem_per_sm"] // (r.smem + 1024) if r.smem else gpu["blocks_per_sm"]
    return {"regs": by_regs, "threads": by_threads, "smem": by_smem,
            "blocks": max(0, min(by_regs, by_threads, by_smem, gpu["blocks_per_sm"]))}


# ----------------------------------------------------------------------------- part 2
@dataclass
class Launch:
    kernel: str
    launches: int
    blocks: int            # per launch
    bytes: float = 0.0     # per launch, DRAM (or L2 where it fits and says so)
    flops: float = 0.0     # per launch
    peak: str = "fp32_simt"
    instr: float = 0.0     # warp instructions per launch, where issue-bound
    fixed_s: float = 0.0   # per launch: a serial term the review counted (barriers, round trips)
    note: str = ""
    library: bool = False  # cuBLAS / ATen kernels: no entry in part 1
    variant: str = ""      # the template arguments launched ("<float, 1>"), where they differ in resources

    def seconds(self, res: Dict[str, Resources], gpu=H200) -> float:
        """One launch: its grid occupies min(SMs, blocks) SMs with the blocks per SM that
        the registers, threads and shared memory allow (or fewer, where the grid is
        small). Bandwidth: min(the GPU's, active SMs × ~64 B per clock each), times
        min(1, resident warps / 50 %); issue: 4 warp instructions per clock per active
        SM, times min(1, resident warps / 25 %). Library kernels (cuBLAS, ATen) are
        taken at the peak of their kind."""
        bw, issue, peak = gpu["bandwidth"], gpu["issue"], gpu[self.peak]
        if not self.library and self.kernel in res:
            threads = THREADS[self.kernel]
            r = res.get(self.kernel + self.variant, res[self.kernel])
            bps = max(1, blocks_per_sm(r, threads, gpu)["blocks"])
            active = min(gpu["sms"], self.blocks)
            resident = min(bps, math.ceil(self.blocks / gpu["sms"])) * threads / gpu["threads_per_sm"]
            bw = min(bw, active * 64 * gpu["clock"]) * min(1.0, resident / 0.5)
            issue = active * 4 * gpu["clock"] * min(1.0, resident / 0.25)
            peak = peak * active / gpu["sms"]
        t = max(self.bytes / bw if self.bytes else 0.0, self.flops / peak if self.flops else 0.0,
                self.instr / issue if self.instr else 0.0)
        return self.launches * (gpu["launch_s"] + t + self.fixed_s)


@dataclass
class Row:
    name: str                 # the row of benchmarks/gpu_targets.py, up to its " (goal ..." part
    goal: str
    launches: List[Launch]
    floor: str = ""           # what the goal compares with
    floor_s: float = 0.0
    syncs: int = 0            # host reads per call
    notes: List[str] = field(default_factory=list)


def blocks(n: float, per: float) -> int:
    return max(1, math.ceil(n / per))


def settle_launch(B: int, M: int, D: int, es: int, rescans: float) -> Launch:
    """settle_parts_kernel: a fixed grid of 1056 blocks (kSettleBlocks) strides over the
    (rescanned anchor, part) items; an anchor's M rows are split in min(1024, M / 64) parts,
    8 warps each, and a warp forms its rows' exact keys one after the other (~1.2 µs each,
    the SASS review's 0.6 ms for 512 of them). No rescans: one load per block."""
    parts = max(1, min(1024, math.ceil(M / 64), max(B, 1 << 14) // max(1, math.ceil(rescans))))
    per_warp = math.ceil(M / parts / 8)
    rounds = math.ceil(rescans * parts / 1056)
    return Launch("settle_parts_kernel", 1, 1056, bytes=rescans * M * D * es, fixed_s=rounds * per_warp * 1.2e-6,
                  note=f"{rescans:g} rescanned anchors assumed (gpu-check prints the count); each over {parts} blocks, "
                       f"{per_warp} exact keys per warp (was one warp per 2^18 elements: ~0.6 ms per anchor)")


def ref_grad_launches(B: int, D: int, hub: int) -> List[Launch]:
    """The reference rows' gradient: a warp per chunk of at most 8 terms (kHubChunk), each
    term ~3 dependent round trips (~0.6 µs each: entry, coefficients, rows) after the
    chunk's end is found (up to 8 loads); then ref_merge_kernel adds the chunks of the
    longest group ("hub": the SASS review's ~142 anchors on one row at B = 8192, ~98 at
    4096) one partial row after the other."""
    chunk = min(hub, 8)
    chunks = math.ceil(hub / 8)
    return [
        Launch("ref_grad_kernel", 1, min(4096, blocks(2 * B, 8)), bytes=3 * B * D * 4,
               fixed_s=(3 * chunk + chunk) * 0.6e-6,
               note=f"the largest hub ({hub} terms) in {chunks} chunks of ≤ 8: ~{4 * chunk} round trips "
                    "(was one warp's chain of all its terms: ~3 round trips each)"),
        Launch("ref_merge_kernel", 1, min(4096, blocks(2 * B, 8)), bytes=2 * B * 8 + (chunks + 1) * D * 4,
               fixed_s=(chunks + 2) * 0.6e-6, note=f"{chunks} partial rows added in order"),
    ]


def batch_hard_rows(B: int, D: int, dtype: str, rescans: float = 0.0) -> List[Launch]:
    """Self-mining above kSmallMaxB (1024), forward + backward (csrc/cuda/batch_hard_cuda.cu)."""
    es = 2 if dtype == "bf16" else 4
    tile = min(B, 4096)
    n_t = math.ceil(B / tile)
    tiles = n_t * (n_t + 1) // 2
    slots = max(math.ceil(tile / 2048), math.ceil(tile / 256))  # kRowChunk, kColumnChunk
    state_bytes = slots * B * (9 * 4 + 6 * 8)                   # kStateKeys fp32 keys, kStateIdx int64
    diag, off = n_t, tiles - n_t
    row_blocks = blocks(tile, 8) * math.ceil(tile / 2048)
    col_blocks = blocks(tile, 256) * math.ceil(tile / 256)
    out = [
        Launch("prepare_rows_kernel", 1, blocks(D, 32), bytes=(3 * B * D * es) if dtype != "bf16" else D * 4,
               note=f"{blocks(D, 32)} blocks: a few SMs stream B·D twice (issue 35: small grid)" if dtype != "bf16"
               else "halves are not shifted: the counters and a zero shift only"),
        Launch("row_norms_kernel", 1, blocks(B, 8), bytes=B * D * 4 + state_bytes, note="norms + state reset"),
        Launch("cuBLAS GEMM (tile)", tiles, 132, flops=2 * tile * tile * D,
               peak="bf16_gemm" if dtype == "bf16" else "fp32_gemm", library=True,
               note=f"{tiles} tiles of {tile}²×{D}" + (" on tensor cores (mm.dtype_out)" if dtype == "bf16" else "")),
        Launch("mine_tile_kernel", diag, row_blocks, bytes=tile * tile * 4, instr=tile * tile * 42 / 32,
               note="diagonal tiles: rows only; ~42 instructions per key (sm_90 SASS; was ~55)"),
        Launch("mine_tile_kernel", off, row_blocks + col_blocks, bytes=2 * tile * tile * 4,
               instr=2 * tile * tile * 42 / 32, note="off-diagonal: rows and columns"),
        Launch("merge_slots_kernel", 1, blocks(B, 8), bytes=state_bytes),
        settle_launch(B, B, D, es, rescans),
        Launch("finish_anchors_kernel", 1, blocks(B, 8), bytes=3 * B * D * es),
        Launch("count_kernel", 1, 32, bytes=B * 16, fixed_s=math.ceil(B / 8192) * 0.5e-6,
               note="32 blocks (was 1: B / 256 dependent passes)"),
        Launch("anchor_grad_kernel", 1, min(4096, blocks(B, 8)), bytes=4 * B * D * 4),
        Launch("at::sort (2B int64, cub radix)", 1, 132, bytes=2 * B * 8 * 2 * 8, library=True,
               fixed_s=4 * 3e-6, note="~4 passes, ~4 launches"),
        *ref_grad_launches(B, D, hub=142 if B >= 8192 else 98 if B >= 4096 else 32),
    ]
    return out


def bank_rows(B: int, M: int, D: int) -> List[Launch]:
    cols = min(M, (1 << 25) // B)
    n = math.ceil(M / cols)
    slots = math.ceil(cols / 2048)
    state_bytes = slots * B * (9 * 4 + 6 * 8)
    return [
        Launch("prepare_rows_kernel", 1, blocks(D, 32), bytes=3 * B * D * 4),
        Launch("row_norms_kernel", 1, blocks(B, 8), bytes=B * D * 4 + state_bytes),
        Launch("row_norms_kernel", n, blocks(cols, 8), bytes=2 * cols * D * 4,
               note="the tile shifted and its norms in one pass (was a separate at::sub_out: a read and a "
                    "write more)"),
        Launch("cuBLAS GEMM (tile)", n, 132, flops=2 * B * cols * D, peak="fp32_gemm", library=True,
               note=f"{n} tiles of {B}×{cols}×{D}"),
        Launch("mine_tile_kernel", n, blocks(B, 8) * math.ceil(cols / 2048), bytes=B * cols * 4,
               instr=B * cols * 42 / 32, note="issue-bound: ~42 instructions per key in the sm_90 SASS (was ~55: SASS review); "
                    "3 blocks per SM (80 registers)"),
        Launch("merge_slots_kernel", 1, blocks(B, 8), bytes=state_bytes),
        settle_launch(B, M, D, 4, 0),
        Launch("finish_anchors_kernel", 1, blocks(B, 8), bytes=3 * B * D * 4),
        Launch("count_kernel", 1, 32, bytes=B * 16, fixed_s=math.ceil(B / 8192) * 0.5e-6),
        Launch("anchor_grad_kernel", 1, blocks(B, 8), bytes=4 * B * D * 4),
        Launch("at::zeros (bank gradient)", 1, 132, bytes=M * D * 4, library=True),
        Launch("at::sort (2B int64, cub radix)", 1, 132, bytes=2 * B * 8 * 16, library=True, fixed_s=12e-6),
        *ref_grad_launches(B, D, hub=8),
    ]


def batch_all_rows(B: int, D: int, positives: int = 7) -> List[Launch]:
    """B = 8192: the shared-sort path (pairwise_distance in float64, then
    batch_all_stream_kernel: each anchor's positives sorted, its row streamed), forward.
    The benchmark's data: B / 8 classes, so 7 positives per anchor."""
    p2 = 1 << max(0, math.ceil(math.log2(max(positives, 1))))
    stages = int(math.log2(p2)) * (int(math.log2(p2)) + 1) // 2
    rounds = math.ceil(B / 256)
    # per block: the gather's rounds (2 barriers each), the positives' sort, 4 block sums and
    # a scan, at ~150 cycles per barrier; 8 blocks per SM overlap them (B / 132 / 8 waves).
    serial = (2 * rounds + stages + 12) * 150 / H200["clock"] * math.ceil(B / (132 * 8))
    return [
        Launch("at::to (rows to float64)", 1, 132, bytes=B * D * 12, library=True),
        Launch("cuBLAS DGEMM (Gram)", 1, 132, flops=2 * B * B * D, peak="fp64_gemm", library=True),
        Launch("gram_to_distance_kernel", 1, blocks(B * B, 256), bytes=2 * B * B * 8),
        Launch("close_pairs_kernel", 1, blocks(B, 8), bytes=B * B * 8 / 8, note="rows of near pairs, rare"),
        Launch("batch_all_stream_kernel", 1, B, bytes=2 * B * B * 8, fixed_s=serial,
               note=f"two reads of each row (the second mostly from L2), a {p2}-entry sort of the positives "
                    f"({stages} stages), B·log2(P) compares; was a {int(math.log2(B))}-level bitonic sort of "
                    "the whole row (~5.8 ms: SASS review)"),
    ]


def knn_rows(Q: int, G: int, D: int) -> List[Launch]:
    cols = min(G, (1 << 26) // Q)
    n = math.ceil(G / cols)
    cand = Q * 10 * (1 + math.log(G / 256))
    return [
        Launch("ATen: norms, shift, bias (gallery)", 4, 132, bytes=3 * G * D * 4, library=True,
               note="the gallery's mean, shift and norms: ~4 passes (issue 35: about 10 in all)"),
        Launch("cuBLAS addmm (tile + bias)", n, 132, flops=2 * Q * cols * D, bytes=Q * cols * 4, peak="fp32_gemm",
               library=True, note=f"{n} tiles of {Q}×{cols}"),
        Launch("knn_tile_select_kernel", n, blocks(Q * max(1, 132 * 64 // Q), 8), bytes=Q * cols * 4,
               variant="<float, 1>", note="k = 10: one key per lane (59 registers, 4 blocks per SM; the 128 "
                                         "of the kernel table are k > 128's)"),
        Launch("knn_exact_keys_kernel", 1, blocks(cand, 8), bytes=cand * D * 8),
        Launch("at::sort x3 (candidates)", 3, 132, bytes=cand * 16 * 4, library=True, fixed_s=12e-6),
    ]


def target_rows() -> List[Row]:
    rows = []
    gemm = lambda b, d, peak="fp32_gemm": 2 * b * b * d / H200[peak]  # noqa: E731
    r = Row("batch_hard fp32 B=4096 D=512", "≥ 4× eager, ≥ 3× compile", batch_hard_rows(4096, 512, "fp32"),
            "one x·xᵀ GEMM", gemm(4096, 512))
    rows.append(r)
    rows.append(Row("batch_hard fp32 B=8192 D=512", "≤ 1.0× one x·xᵀ GEMM", batch_hard_rows(8192, 512, "fp32"),
                    "one x·xᵀ GEMM", gemm(8192, 512)))
    rows.append(Row("batch_hard bf16 B=8192 D=512", "≤ 2.5× one bf16 GEMM, ≥ 10× eager",
                    batch_hard_rows(8192, 512, "bf16", rescans=1), "one bf16 x·xᵀ GEMM", gemm(8192, 512, "bf16_gemm")))
    rows.append(Row("bank fp32 B=1024 M=2^20 D=128", "≤ 1.3× one B×M GEMM, ≥ 5× eager",
                    bank_rows(1024, 1 << 20, 128), "one B×M GEMM", 2 * 1024 * (1 << 20) * 128 / H200["fp32_gemm"]))
    rows.append(Row("batch_all fp32 B=8192 D=512 fwd", "≤ 5× one GEMM", batch_all_rows(8192, 512),
                    "one x·xᵀ GEMM (fp32)", gemm(8192, 512)))
    rows.append(Row("knn fp32 Q=1024 G=2^20 D=64 k=10 fwd", "~1.3× one GEMM (model in the code)", knn_rows(1024, 1 << 20, 64),
                    "one Q×Gᵀ GEMM", 2 * 1024 * (1 << 20) * 64 / H200["fp32_gemm"], syncs=2))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description="make cuda-perf")
    ap.add_argument("--json", help="write {row: {kernel: modelled µs}} here")
    ap.add_argument("--update-snapshot", action="store_true",
                    help=f"rewrite {os.path.relpath(SNAPSHOT, ROOT)} from the current ptxas report")
    ap.add_argument("--no-compile", action="store_true", help="never run nvcc (the report or the snapshot)")
    args = ap.parse_args()

    res = resources(compile_if_stale=not args.no_compile)
    missing_threads = [k for k in kernels_in_sources() if k not in THREADS]
    missing_res = [k for k in kernels_in_sources() if k not in res]
    print("## Kernels (sm_90, ptxas)\n")
    print("| kernel | threads | registers | smem B | spill B | blocks/SM (regs, threads, smem) | occupancy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k in kernels_in_sources():
        if k not in res or k not in THREADS:
            continue
        r, t = res[k], THREADS[k]
        b = blocks_per_sm(r, t)
        occ = b["blocks"] * t / H200["threads_per_sm"]
        flag = "  ← below 50 %" if occ < 0.5 else ""
        print(f"| {k} | {t} | {r.regs} | {r.smem} | {r.spill} | {b['blocks']} ({b['regs']}, {b['threads']}, "
              f"{b['smem']}) | {occ:.0%}{flag} |")
    models: Dict[str, Dict[str, float]] = {}
    print("\n## Target rows (H200 model: not measured)\n")
    for row in target_rows():
        total = sum(l.seconds(res) for l in row.launches) + row.syncs * H200["sync_s"]
        print(f"### {row.name} — goal {row.goal}\n")
        print("| kernel | launches | grid | MB per launch | GFLOP per launch | model µs | share | note |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        per: Dict[str, float] = {}
        for l in row.launches:
            s = l.seconds(res)
            per[l.kernel] = per.get(l.kernel, 0.0) + s * 1e6
            print(f"| {l.kernel} | {l.launches} | {l.blocks} | {l.bytes / 1e6:.1f} | {l.flops / 1e9:.2f} | "
                  f"{s * 1e6:.1f} | {s / total:.0%} | {l.note} |")
        if row.syncs:
            print(f"| host reads | {row.syncs} | | | | {row.syncs * H200['sync_s'] * 1e6:.1f} | | |")
            per["host reads"] = row.syncs * H200["sync_s"] * 1e6
        print(f"\n**Model: {total * 1e3:.3f} ms**, {total / row.floor_s:.2f}× {row.floor} "
              f"({row.floor_s * 1e3:.3f} ms modelled); the row's model is the sum of the lines above.\n")
        models[row.name] = per
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        json.dump(models, open(args.json, "w"), indent=1)
    if args.update_snapshot:
        json.dump({k: vars(v) for k, v in sorted(res.items())}, open(SNAPSHOT, "w"), indent=1)
        print(f"cuda-perf: wrote {os.path.relpath(SNAPSHOT, ROOT)}")
    if missing_threads or missing_res:
        print(f"cuda-perf: kernels without a block size in THREADS: {missing_threads}; without ptxas "
              f"resources: {missing_res}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
