"""Shared pieces of the benchmark suite and the training script: devices and batch-size
sweeps, peak-memory measurement, and one `run` that times a callable with
pytest-benchmark and records what the comparison report needs.

Peak memory is the peak of tensor memory allocated during one call, above what was
allocated before it: `torch.cuda.max_memory_allocated` on CUDA, and on CPU the running
total of the c10 CPU allocator's allocation events recorded by `torch.profiler`
(`profile_memory=True`). The CPU figure covers every tensor (ATen, inductor, our
kernels' workspaces); it misses memory that a library mallocs for itself (MKL's
internal buffers, for one).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Optional

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# From 32 up to the largest size that fits the time budget of `make bench`: on a 2-core
# CPU the O(B^2 D) peers take seconds per call past 4096; a GPU takes the sweep further.
SWEEP = {"cpu": [32, 64, 128, 256, 512, 1024, 2048, 4096],
         "cuda": [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]}

# Per benchmark, rounds are chosen to roughly fill it; the GPU grid has ~900 cases.
TIME_BUDGET_S = {"cpu": 0.6, "cuda": 0.15}
MIN_ROUNDS, MAX_ROUNDS = 3, 200


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the block (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak extra tensor memory of one call of `fn` (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints "USDT: ... profiler_start/stop" lines that look like errors
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    sizes = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))  # < 0 for a free
        stack.extend(node.children)
    current = peak = 0
    for _, size in sorted(sizes, key=lambda s: s[0]):
        current += size
        peak = max(peak, current)
    return peak


def describe_device(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    import platform

    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(benchmark, fn: Callable[[], object], *, device: str, warmup: int = 1, **info) -> None:
    """Warm `fn` up, measure its peak memory once, then time it with pytest-benchmark.

    On CUDA every timed round is also bracketed by CUDA events: their median (the GPU's
    time from the first kernel of the call to the last, without the host's final
    synchronize) goes to extra_info["event_median_s"], which compare.py reports in
    preference to the host timer's. `info` (family, impl, mode, B, D, dtype, ...) goes
    into the JSON's extra_info, where compare.py finds it.
    """
    event_times: list = []

    def call():
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            event_times.append(start.elapsed_time(end) / 1e3)
            return
        fn()
        synchronize(device)

    for _ in range(warmup):
        call()
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TIME_BUDGET_S[device] / max(once, 1e-6))))
    benchmark.extra_info.update(info, device=device, device_name=describe_device(device),
                                torch=torch.__version__, threads=torch.get_num_threads(),
                                peak_bytes=peak_memory_bytes(call, device))
    event_times.clear()
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=0, iterations=1)
    if event_times:
        benchmark.extra_info["event_median_s"] = sorted(event_times)[len(event_times) // 2]


def replace_section(path: str, name: str, text: str) -> None:
    """Replace what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in a file."""
    import re

    with open(path) as f:
        old = f.read()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    new, n = re.subn(f"({re.escape(begin)}\n).*?({re.escape(end)})", lambda m: m.group(1) + text + m.group(2),
                     old, flags=re.S)
    if n != 1:
        raise SystemExit(f"{path}: markers {begin} / {end} not found")
    with open(path, "w") as f:
        f.write(new)


def faiss_or_none():
    """faiss (faiss-cpu), or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def pml_or_none():
    """pytorch_metric_learning when installed (it is pure Python), else None."""
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return None
    from pytorch_metric_learning import distances, losses, miners, reducers

    return distances, losses, miners, reducers


def fwd_bwd(loss_fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, mode: str) -> Callable[[], object]:
    """The timed callable: forward on detached inputs ("fwd"), or forward + backward
    into fresh gradients ("fwd+bwd")."""
    if mode == "fwd":
        detached = [t.detach() if t.is_floating_point() else t for t in inputs]
        return lambda: loss_fn(*detached)
    leaves = [t for t in inputs if t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        out = loss_fn(*inputs)
        out.backward(torch.ones_like(out) if out.dim() else None)

    return step


# The GPU report's grid (issue 13): D in {128, 512}, fp32 and bf16, on CUDA.
CUDA_DIMS = [128, 512]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def grid(d_cpu: int = 128) -> list:
    """(device, B, D, dtype name) of a sweep: on CPU B over SWEEP at D = d_cpu in fp32;
    on CUDA B over SWEEP up to 8192 at each D of CUDA_DIMS, in fp32 and bf16."""
    cases = [("cpu", b, d_cpu, "fp32") for b in SWEEP["cpu"]] if "cpu" in DEVICES else []
    if "cuda" in DEVICES:
        cases += [("cuda", b, d, dt) for dt in DTYPES for d in CUDA_DIMS for b in SWEEP["cuda"] if b <= 8192]
    return cases


def case_id(case) -> str:
    device, b, d, dt = case
    return f"{device}-B{b}-D{d}" + ("" if dt == "fp32" else f"-{dt}")


def inputs(b: int, d: int, device: str, *, seed: int = 0, classes: Optional[int] = None,
           dtype: torch.dtype = torch.float32):
    """Random (B, D) embeddings that require grad and labels with ~4 samples per class,
    as in P x K batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype).to(device).requires_grad_(True)
    y = torch.randint(0, classes or max(1, b // 4), (b,), generator=g).to(device)
    return x, y
