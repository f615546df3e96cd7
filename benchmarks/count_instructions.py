"""The fixed cost of one loss call in instructions, not seconds: callgrind counts what a
forward + backward executes, the same on every run of the same build, whatever else the
machine is doing (on our shared 2-core machines wall-clock ratios at B = 8 moved by 0.3x
between quiet and busy hours).

    python benchmarks/count_instructions.py [--cases batch_hard_loss floor] [--calls 400]

For each case, two runs under `valgrind --tool=callgrind` (import and warm-up alone, then
with --calls more calls, garbage collection off in both): the difference divided by
--calls is the instructions of one call. PYTHONPATH=/path/to/another/checkout (built in
place) measures that checkout's tripletops. Prints a table with the ratio of each case to the floor (one autograd GEMM,
`(x @ x.T).sum()` forward + backward, B = 8, D = 8) and the commit it measured. Each run
takes about 1.5 minutes. Needs valgrind. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import sys, torch, tripletops
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
B, D = int(sys.argv[3]), int(sys.argv[4])
x = torch.randn(B, D, generator=g).requires_grad_(True)
y = torch.arange(B) // 4
a, p, n = (torch.randn(B, D, generator=g).requires_grad_(True) for _ in range(3))
cases = {
    "floor": lambda: (x @ x.T).sum(),
    "batch_hard_loss": lambda: tripletops.batch_hard_loss(x, y),
    "batch_all_loss": lambda: tripletops.batch_all_loss(x, y),
    "semi_hard_loss": lambda: tripletops.semi_hard_loss(x, y),
    "contrastive_loss": lambda: tripletops.contrastive_loss(x, y),
    "triplet_margin_loss": lambda: tripletops.triplet_margin_loss(a, p, n),
}
f = cases[sys.argv[2]]
for _ in range(50):
    f().backward()
# No garbage collection inside the measured calls: a full collection of torch's heap costs
# tens of millions of instructions, and whether one falls among the calls depends on the
# script, not on the call (without this, one build's count moved by ~20 % between harnesses).
import gc
gc.collect()
gc.freeze()
gc.disable()
for _ in range(int(sys.argv[1])):
    f().backward()
print(tripletops.__file__)
"""


def collected(calls: int, case: str, b: int, d: int, script: str) -> int:
    res = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, script,
                          str(calls), case, str(b), str(d)], capture_output=True, text=True, cwd=ROOT)
    m = re.search(r"Collected : (\d+)", res.stderr)
    if res.returncode != 0 or not m:
        raise SystemExit(f"callgrind failed for {case}:\n{res.stderr[-2000:]}")
    collected.package = os.path.dirname(os.path.dirname(res.stdout.strip().splitlines()[-1]))
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["floor", "batch_hard_loss"])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--size", type=int, nargs=2, default=(8, 8), metavar=("B", "D"))
    args = ap.parse_args()
    per_call = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        for case in args.cases:
            base = collected(0, case, *args.size, script)
            more = collected(args.calls, case, *args.size, script)
            per_call[case] = (more - base) / args.calls
            print(f"{case}: {per_call[case]:,.0f} instructions per call", flush=True)
    # The commit of the tripletops that ran (PYTHONPATH=/path/to/another/checkout measures that one).
    where = getattr(collected, "package", ROOT)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=where).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=where).stdout.strip()
    b, d = args.size
    print(f"\nInstructions per forward + backward (callgrind), B={b}, D={d}, commit {commit}"
          f"{' with uncommitted changes' if dirty else ''}:\n")
    print("| case | instructions | ratio to the floor |\n|---|---|---|")
    floor = per_call.get("floor")
    for case, v in per_call.items():
        print(f"| {case} | {v:,.0f} | {v / floor:.3f}× |" if floor else f"| {case} | {v:,.0f} | |")


if __name__ == "__main__":
    main()
