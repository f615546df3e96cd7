"""Turns a pytest-benchmark JSON run of the suite into the comparison report:

- a markdown file of medians, speedups of tripletops over every peer, and peak memory,
  per op family, device and mode (forward / forward + backward), plus the performance
  targets judged on the same run;
- a PNG plot per device: speedup and peak memory against batch size, log axes;
- with --readme, the summary written into docs/performance.md between `<!-- perf:begin -->` and
  `<!-- perf:end -->`; given the CPU and the CUDA JSON, it shows both devices.

    python benchmarks/compare.py benchmarks/results/cpu.json \
        --markdown benchmarks/results/cpu.md --plot benchmarks/results/cpu.png
    python benchmarks/compare.py benchmarks/results/cpu.json benchmarks/results/cuda.json --readme docs/performance.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

FAMILIES = {
    "batch_hard": ("Batch-hard triplet loss", ["eager", "compile(eager)", "reference", "compile(reference)", "pml"]),
    "pairwise_distance": ("Pairwise distance matrix", ["eager", "reference", "compile(reference)", "pml"]),
    "triplet_margin": ("Triplet margin loss over explicit triplets", ["eager", "reference", "compile(reference)", "pml"]),
    "batch_all": ("Batch-all triplet loss (every valid triplet)", ["reference", "compile(reference)", "pml"]),
    "semi_hard": ("Semi-hard triplet loss (TF-Addons semantics)", ["reference", "compile(reference)"]),
    "contrastive": ("Contrastive loss (all pairs)", ["reference", "compile(reference)", "pml"]),
    "multilabel": ("Batch-hard with multi-hot labels (L = 64; tripletops) against class ids", ["single-label"]),
}
PEER_NAMES = {
    ("batch_hard", "eager"): "eager (cdist + masks)",
    ("pairwise_distance", "eager"): "torch.cdist",
    ("triplet_margin", "eager"): "F.triplet_margin_loss",
    "compile(eager)": "torch.compile(eager)",
    ("batch_all", "reference"): "eager B³ (tripletops.reference)",
    ("semi_hard", "reference"): "eager TF-Addons-style B³ (tripletops.reference)",
    "reference": "tripletops.reference",
    "compile(reference)": "torch.compile(reference)",
    "pml": "PML",
    "gemm": "one x·xᵀ GEMM",
}
# Every family again in bf16 (the CUDA grid): "<family>_bf16".
FAMILIES.update({f"{f}_bf16": (f"{title}, bf16", peers) for f, (title, peers) in list(FAMILIES.items())})
MODES = {"fwd": "forward", "fwd+bwd": "forward + backward", "mine": "mining alone"}


def peer_name(family: str, impl: str) -> str:
    return PEER_NAMES.get((family, impl), PEER_NAMES.get(impl, impl))


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    ms = seconds * 1e3
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 1000 else f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    if n < 2**20:
        return f"{n / 1024:.0f} KiB"
    mib = n / 2**20
    return f"{mib:.2f} MiB" if mib < 10 else f"{mib:.0f} MiB" if mib < 10240 else f"{mib / 1024:.1f} GiB"


def load(run: dict) -> dict:
    """{(family, device, mode, B, D): {impl: (median_s, peak_bytes)}}, plus bank rows."""
    rows = defaultdict(dict)
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        family, dtype = info["family"], info.get("dtype", "fp32")
        if dtype != "fp32" and not family.endswith(f"_{dtype}"):
            family = f"{family}_{dtype}"
        key = (family, info["device"], info["mode"], info["B"], info["D"], info.get("M"))
        # CUDA: the CUDA-event median (GPU time of the call) when recorded, else the host timer's.
        rows[key][info["impl"]] = (info.get("event_median_s", bench["stats"]["median"]), info.get("peak_bytes"))
    return rows


def _shared_gemm(family: str) -> str:
    """The family name under which bench_loss_family's shared GEMM floor is stored."""
    return "gemm_bf16" if family.endswith("_bf16") else "gemm"


def machine_line(run: dict, device: str) -> str:
    infos = [b["extra_info"] for b in run["benchmarks"] if b["extra_info"]["device"] == device]
    info = infos[0]
    cpu = run.get("machine_info", {}).get("cpu", {}).get("brand_raw", "unknown CPU")
    where = cpu if device == "cpu" else info["device_name"]
    return (f"**{device.upper()}**: {where}; {info['threads']} CPU threads; torch {info['torch']}. "
            f"Medians of each case; peak memory is the tensor memory allocated above the inputs during one call "
            f"({'torch.cuda.max_memory_allocated' if device == 'cuda' else 'the CPU allocator events of torch.profiler'}).")


def family_tables(rows: dict, family: str, device: str, mode: str) -> list[str]:
    title, peers = FAMILIES[family]
    cases = sorted((k for k in rows if k[0] == family and k[1] == device and k[2] == mode), key=lambda k: (k[4], k[3]))
    if not cases:
        return []
    gram = not family.startswith("triplet_margin")  # explicit triplets form no (B, B) Gram
    own = {(k[3], k[4]): rows[k]["gemm"] for k in rows if k[0] == family and k[1] == device and k[2] == "gemm"}
    shared = {(k[3], k[4]): rows[k]["gemm"] for k in rows
              if k[0] == _shared_gemm(family) and k[1] == device and k[2] == "gemm"}
    gemm = (own or shared) if gram else {}
    impls = ["tripletops"] + [p for p in peers if any(p in rows[k] for k in cases)]
    floor = bool(gemm)
    head = ["B, D"] + [peer_name(family, i) for i in impls] + (["one x·xᵀ GEMM"] if floor else [])
    head += [f"vs {peer_name(family, p)}" for p in impls[1:]] + (["tripletops / GEMM"] if floor else [])
    head += ["Gram TFLOP/s"] if gram else []  # 2·B²·D over tripletops' time: the Gram it forms, as a rate
    out = [f"#### {title} — {device}, {MODES[mode]}", "", "| " + " | ".join(head) + " |",
           "|" + " --- |" * len(head)]
    for k in cases:
        m = rows[k]
        t = m.get("tripletops", (None,))[0]
        cells = [f"{k[3]}, {k[4]}"] + [fmt_time(m[i][0]) if i in m else "—" for i in impls]
        g = gemm.get((k[3], k[4]))
        if floor:
            cells.append(fmt_time(g[0]) if g else "—")
        cells += [f"{m[p][0] / t:.1f}×" if t and p in m else "—" for p in impls[1:]]
        if floor:
            cells.append(f"{t / g[0]:.2f}" if t and g else "—")
        if gram:
            cells.append(f"{2 * k[3] ** 2 * k[4] / t / 1e12:.3g}" if t else "—")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", f"Peak memory, {MODES[mode]}:", "", "| B, D | " + " | ".join(peer_name(family, i) for i in impls) + " |",
            "|" + " --- |" * (len(impls) + 1)]
    for k in cases:
        m = rows[k]
        out.append(f"| {k[3]}, {k[4]} | " + " | ".join(
            fmt_bytes(m[i][1]) if i in m and m[i][1] is not None else "—" for i in impls) + " |")
    return out + [""]


def _ratio(rows, key, num, den):
    m = rows.get(key, {})
    return (m[num][0] / m[den][0], m[num][0], m[den][0]) if num in m and den in m else None


def targets(rows: dict, device: str) -> list[str]:
    """The performance targets of the issues, judged on this run."""
    lines = ["| target | measured | |", "| --- | --- | --- |"]
    checks = []
    if device == "cpu":
        for b, d in ((256, 128), (1024, 256)):
            checks.append((f"B={b}, D={d}, fp32: ≥ 5× faster than eager", ("batch_hard", device, "fwd+bwd", b, d, None),
                           "eager", "tripletops", 5.0, "≥"))
        checks.append(("B=4096, D=512: ≤ 1.0× one x·xᵀ GEMM", ("batch_hard", 4096), None, None, 1.0, "≤gemm"))
        checks.append(("batch-all, B=512, D=128: ≥ 10× the eager B³ version", ("batch_all", device, "fwd+bwd", 512, 128,
                       None), "reference", "tripletops", 10.0, "≥"))
    else:
        checks.append(("batch-all, B=512, D=128: ≥ 50× the eager B³ version", ("batch_all", device, "fwd+bwd", 512, 128,
                       None), "reference", "tripletops", 50.0, "≥"))
        checks.append(("batch-all, B=512, D=128: ≥ 5× PML's all-triplets loss", ("batch_all", device, "fwd+bwd", 512,
                       128, None), "pml", "tripletops", 5.0, "≥"))
        checks.append(("semi-hard, B=512, D=128: ≥ 50× the eager recipe", ("semi_hard", device, "fwd+bwd", 512, 128,
                       None), "reference", "tripletops", 50.0, "≥"))
        checks.append(("contrastive, B=1024, D=128: ≥ 3× PML", ("contrastive", device, "fwd+bwd", 1024, 128, None),
                       "pml", "tripletops", 3.0, "≥"))
        checks.append(("B=256, D=128, fp32: ≥ 10× eager", ("batch_hard", device, "fwd+bwd", 256, 128, None),
                       "eager", "tripletops", 10.0, "≥"))
        checks.append(("B=256, D=128, fp32: ≥ 4× torch.compile(eager)", ("batch_hard", device, "fwd+bwd", 256, 128, None),
                       "compile(eager)", "tripletops", 4.0, "≥"))
        checks.append(("B=256, D=128, fp32: ≥ 4× torch.compile(reference)", ("batch_hard", device, "fwd+bwd", 256, 128, None),
                       "compile(reference)", "tripletops", 4.0, "≥"))
        checks.append(("B=256, D=128, fp32: ≥ 20× PML", ("batch_hard", device, "fwd+bwd", 256, 128, None),
                       "pml", "tripletops", 20.0, "≥"))
    if device == "cuda":
        checks.append(("B=8192, D=512, fp32: ≤ 1.0× one x·xᵀ GEMM", ("batch_hard", 8192), None, None, 1.0, "≤gemm"))
        checks.append(("B=8192, D=512, bf16: ≤ 1.0× one x·xᵀ GEMM", ("batch_hard_bf16", 8192), None, None, 1.0,
                       "≤gemm"))
        checks.append(("B=1024 against 2²⁰×128: ≤ 1.2× one B×M GEMM", ("bank", 1024), None, None, 1.2, "≤bank"))
    for mode in ("mine", "fwd+bwd"):  # issue 15: multi-label mining <= 1.2x single-label, same run
        m = rows.get(("multilabel", device, mode, 1024, 128, None), {})
        if "tripletops" in m and "single-label" in m:
            r = m["tripletops"][0] / m["single-label"][0]
            lines.append(f"| multi-label (L = 64) {MODES[mode]}, B=1024, D=128: ≤ 1.2× single-label | {r:.2f}× "
                         f"({fmt_time(m['tripletops'][0])} vs {fmt_time(m['single-label'][0])}) "
                         f"| {'met' if r <= 1.2 else '**not met**'} |")
    for name, key, num, den, goal, how in checks:
        if how == "≤bank":
            found = [(k, m) for k, m in rows.items() if k[0] == "bank" and k[1] == device and "tripletops" in m
                     and "gemm" in m]
            for k, m in found:
                r = m["tripletops"][0] / m["gemm"][0]
                lines.append(f"| {name} | {r:.2f}× ({fmt_time(m['tripletops'][0])} vs {fmt_time(m['gemm'][0])}); "
                             f"peak {fmt_bytes(m['tripletops'][1])} | {'met' if r <= goal else '**not met**'} |")
            continue
        if how == "≤gemm":
            family, size = key if key else ("batch_hard", 4096)
            m = rows.get((family, device, "fwd+bwd", size, 512, None), {})
            g = rows.get((family, device, "gemm", size, 512, None), {}).get("gemm")
            if "tripletops" not in m or g is None:
                continue
            r = m["tripletops"][0] / g[0]
            lines.append(f"| {name} | {r:.2f}× ({fmt_time(m['tripletops'][0])} vs {fmt_time(g[0])}) "
                         f"| {'met' if r <= goal else '**not met**'} |")
            continue
        res = _ratio(rows, key, num, den)
        if res is None:
            continue
        r, a, b = res
        lines.append(f"| {name} | {r:.1f}× ({fmt_time(b)} vs {fmt_time(a)}) | {'met' if r >= goal else '**not met**'} |")
    return lines if len(lines) > 2 else []


def bank_lines(rows: dict, device: str) -> list[str]:
    out = []
    for k, m in sorted(rows.items(), key=lambda kv: str(kv[0])):
        if k[0] == "bank" and k[1] == device and "tripletops" in m:
            t, peak = m["tripletops"]
            bxm = k[3] * k[5] * 4
            out.append(f"Memory bank, B = {k[3]} against M = {k[5]:,} × {k[4]} (fp32): {fmt_time(t)} forward + backward, "
                       f"peak extra memory {fmt_bytes(peak)} (a B×M float matrix alone is {fmt_bytes(bxm)}).")
    return out


def report(run: dict, devices: list[str], *, full: bool, plot_names: dict[str, str]) -> str:
    rows = load(run)
    out = []
    for device in devices:
        out += [machine_line(run, device), ""]
        t = targets(rows, device)
        if t:
            out += t + [""]
        out += bank_lines(rows, device) + [""]
        for family in FAMILIES:
            for mode in (MODES if full else ["fwd+bwd"]):
                if full or family in ("batch_hard", "batch_all"):
                    out += family_tables(rows, family, device, mode)
        if device in plot_names:
            out += [f"![speedup and peak memory against batch size, {device}]({plot_names[device]})", ""]
    return "\n".join(out).rstrip() + "\n"


def plot(run: dict, device: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = load(run)
    fams = [f for f in FAMILIES if any(k[0] == f and k[1] == device for k in rows)]
    fig, axes = plt.subplots(len(fams), 2, figsize=(12, 3.6 * len(fams)), squeeze=False)
    for ax_row, family in zip(axes, fams):
        title, peers = FAMILIES[family]
        cases = sorted((k for k in rows if k[:3] == (family, device, "fwd+bwd") and k[4] == 128), key=lambda k: k[3])
        bs = [k[3] for k in cases]
        for p in peers:
            pts = [(k[3], rows[k][p][0] / rows[k]["tripletops"][0]) for k in cases
                   if p in rows[k] and "tripletops" in rows[k]]
            if pts:
                ax_row[0].plot(*zip(*pts), marker="o", label=f"vs {peer_name(family, p)}")
        ax_row[0].axhline(1.0, color="gray", lw=0.8, ls="--")
        ax_row[0].set(xscale="log", yscale="log", xlabel="batch size B (D = 128)", ylabel="speedup of tripletops",
                      title=f"{title}: speedup, forward + backward")
        for i in ["tripletops"] + peers:
            pts = [(k[3], max(rows[k][i][1], 1) / 2**20) for k in cases if i in rows[k] and rows[k][i][1] is not None]
            if pts:
                ax_row[1].plot(*zip(*pts), marker="o", label=peer_name(family, i))
        ax_row[1].set(xscale="log", yscale="log", xlabel="batch size B (D = 128)", ylabel="peak extra memory (MiB)",
                      title=f"{title}: peak memory")
        for ax in ax_row:
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            if bs:
                ax.set_xticks(bs, [str(b) for b in bs], fontsize=7)
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    fig.suptitle(machine_line(run, device).split(";")[0].replace("**", ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output(s) of the suite (one per device)")
    ap.add_argument("--markdown", help="write the full report here")
    ap.add_argument("--plot", help="write the PNG here (with several devices, one per device: a -<device> suffix)")
    ap.add_argument("--readme", help="replace the perf section of this README with the summary")
    args = ap.parse_args()
    run = {"benchmarks": []}
    png_beside = {}  # device -> the PNG next to its JSON, linked when --plot is not given
    for path in args.json:
        with open(path) as f:
            part = json.load(f)
        run.setdefault("machine_info", part.get("machine_info", {}))
        run["benchmarks"] += part["benchmarks"]
        for device in {b["extra_info"]["device"] for b in part["benchmarks"]}:
            if os.path.exists(os.path.splitext(path)[0] + ".png"):
                png_beside[device] = os.path.splitext(path)[0] + ".png"
    devices = sorted({b["extra_info"]["device"] for b in run["benchmarks"]})
    plots = {}
    if args.plot:
        root, ext = os.path.splitext(args.plot)
        for device in devices:
            path = args.plot if len(devices) == 1 else f"{root}-{device}{ext}"
            plot(run, device, path)
            plots[device] = path
    else:
        plots = png_beside
    rel = lambda base: {d: os.path.relpath(p, os.path.dirname(os.path.abspath(base))) for d, p in plots.items()}
    full = report(run, devices, full=True, plot_names=rel(args.markdown) if args.markdown else {})
    print(full)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(full)
    if args.readme:
        summary = report(run, devices, full=False, plot_names=rel(args.readme))
        reports = [args.markdown] if args.markdown else [
            os.path.splitext(p)[0] + ".md" for p in args.json if os.path.exists(os.path.splitext(p)[0] + ".md")]
        if reports:
            here = os.path.dirname(os.path.abspath(args.readme))
            links = ", ".join(f"[{os.path.relpath(r, here)}]({os.path.relpath(r, here)})" for r in reports)
            summary += f"\nEvery family and mode, forward alone included: {links}.\n"
        harness.replace_section(args.readme, "perf", summary)


if __name__ == "__main__":
    main()
