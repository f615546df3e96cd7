"""Turns a pytest-benchmark JSON run of bench_batch_hard.py into a markdown table of
medians and ratios, and (with --readme) writes it into README.md between the
`<!-- perf:begin -->` / `<!-- perf:end -->` markers."""
from __future__ import annotations

import argparse
import json
import platform
import re
from collections import defaultdict

PEERS = ["eager", "compile(eager)", "reference", "compile(reference)", "pml"]


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def build_table(run: dict) -> str:
    med = defaultdict(dict)
    bank = None
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        if "M" in info:
            bank = bench["stats"]["median"]
            continue
        med[(info["B"], info["D"])][info["impl"]] = bench["stats"]["median"]
    machine = run.get("machine_info", {})
    lines = [
        f"CPU: {machine.get('cpu', {}).get('brand_raw', platform.processor() or 'unknown')}, "
        f"{run['benchmarks'][0]['extra_info'].get('threads', '?')} threads, torch "
        f"{run['benchmarks'][0]['extra_info'].get('torch', '?')}; forward + backward, median of each run.",
        "",
        "| B, D | tripletops | eager (cdist+masks) | torch.compile(eager) | reference | torch.compile(reference) "
        "| PML | one x·xᵀ GEMM | vs eager | vs compile(eager) | vs compile(reference) | vs PML | tripletops / GEMM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (b, d), m in sorted(med.items()):
        t = m.get("tripletops")
        cells = [fmt_ms(m[k]) if k in m else "—" for k in ["tripletops"] + PEERS + ["gemm"]]
        ratio = lambda k: f"{m[k] / t:.1f}×" if t and k in m else "—"
        floor = f"{t / m['gemm']:.2f}" if t and "gemm" in m else "—"
        lines.append(f"| {b}, {d} | " + " | ".join(cells) + f" | {ratio('eager')} | {ratio('compile(eager)')} "
                     f"| {ratio('compile(reference)')} | {ratio('pml')} | {floor} |")
    # The CPU targets, judged on this same run.
    lines += ["", "| target | measured | |", "| --- | --- | --- |"]
    for (b, d), goal in (((256, 128), 5.0), ((1024, 256), 5.0)):
        m = med.get((b, d), {})
        if "tripletops" in m and "eager" in m:
            r = m["eager"] / m["tripletops"]
            lines.append(f"| B={b}, D={d}: ≥ {goal:.0f}× faster than eager | {r:.1f}× ({fmt_ms(m['tripletops'])} vs "
                         f"{fmt_ms(m['eager'])}) | {'met' if r >= goal else '**not met**'} |")
    m = med.get((4096, 512), {})
    if "tripletops" in m and "gemm" in m:
        r = m["tripletops"] / m["gemm"]
        lines.append(f"| B=4096, D=512: ≤ 1.0× the time of one x·xᵀ GEMM | {r:.2f}× ({fmt_ms(m['tripletops'])} vs "
                     f"{fmt_ms(m['gemm'])}) | {'met' if r <= 1.0 else '**not met**'} |")
    if bank is not None:
        lines += ["", f"Memory bank, B = 1024 against M = 2²⁰ × 64 (fp32): {fmt_ms(bank)} forward + backward; "
                      "peak memory growth is checked by `tests/test_memory.py` (a B×M float matrix alone is 4 GiB)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--readme", help="replace the perf section of this README")
    args = ap.parse_args()
    with open(args.json) as f:
        table = build_table(json.load(f))
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        new, n = re.subn(r"(<!-- perf:begin -->\n).*?(<!-- perf:end -->)", lambda mm: mm.group(1) + table + mm.group(2),
                         text, flags=re.S)
        if n != 1:
            raise SystemExit(f"{args.readme}: no perf markers found")
        with open(args.readme, "w") as f:
            f.write(new)


if __name__ == "__main__":
    main()
