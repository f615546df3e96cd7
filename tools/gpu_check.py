"""make gpu-check: everything a GPU lease should tell us, in one unattended run of at most
8 minutes, into one folder.

Stages, each with its own time limit (and all of them inside --total seconds); a stage
that fails or runs out of time does not stop the next:

  build       compiler versions, environment, `pip install -e .` with MAX_JOBS = nproc
              (the link line, the GPU code built), then what decides the C++ error-message
              crash: `nm` of _C for libstdc++'s own functions, `ldd`, extension_available()
  tests       the suite's CUDA cases (and the build / native-error checks) with pytest-xdist
  sanitizers  compute-sanitizer memcheck, racecheck, synccheck, initcheck, in parallel,
              over tools/gpu_sanitize_driver.py (every op on each CUDA path)
  benchmarks  benchmarks/gpu_targets.py: the issues' target rows with their peers
  profile     the same script's torch.profiler per-kernel tables (kernel, time, launches),
              each kernel beside its model (tools/cuda_perf.py) with the ratio
  ncu         Nsight Compute on mine_tile_kernel (bank, B = 8192), ref_grad_kernel and
              batch_all_stream_kernel (B = 8192): DRAM %, warps active, issue active,
              occupancy limiter
  training    benchmarks/train_reference.py on CUDA, short: identical trajectories, speedup

Progress lines carry the elapsed seconds; the last lines are the summary (also
summary.md in the folder, which names the device, torch, CUDA and the commit). Logs are
cut to their last 150 KB so that the folder stays well under 2 MB.

    python tools/gpu_check.py --out benchmarks/results/gpu-check

No network is needed: missing wheels (pytorch-metric-learning) are installed from
--wheels (default .whl/) when that folder holds any.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
LOG_LIMIT = 150_000
START = time.monotonic()


def elapsed() -> str:
    return f"[{time.monotonic() - START:6.1f} s]"


def say(msg: str, progress: Optional[str] = None) -> None:
    line = f"{elapsed()} {msg}"
    print(line, flush=True)
    if progress:
        with open(progress, "a") as f:
            f.write(line + "\n")


def trim(text: str) -> str:
    return text if len(text) <= LOG_LIMIT else f"[... first {len(text) - LOG_LIMIT} characters cut ...]\n" + \
        text[-LOG_LIMIT:]


def run(cmd, log: str, timeout: float, env: Optional[dict] = None, shell: bool = False) -> Tuple[int, str]:
    """Run, append its output to `log`, return (exit code or 124 on timeout, output)."""
    start = time.monotonic()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, timeout),
                             env={**os.environ, **(env or {})}, shell=shell)
        code, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        code, out = 124, out + f"\n[timed out after {timeout:.0f} s]"
    except OSError as exc:
        code, out = 127, f"[could not run: {exc}]"
    shown = cmd if isinstance(cmd, str) else " ".join(cmd)
    with open(log, "a") as f:
        f.write(f"$ {shown}\n[exit {code}, {time.monotonic() - start:.1f} s]\n{trim(out)}\n")
    return code, out


class Check:
    def __init__(self, out: str, total: float, wheels: str, jobs: int):
        self.out, self.total, self.wheels, self.jobs = out, total, wheels, jobs
        self.progress = os.path.join(out, "progress.log")
        self.results: List[Tuple[str, str, float, str]] = []  # (stage, status, seconds, key figures)

    def log(self, name: str) -> str:
        return os.path.join(self.out, f"{name}.log")

    def left(self, limit: float) -> float:
        return min(limit, self.total - (time.monotonic() - START))

    # ---- (a) build
    def build(self, limit: float) -> Tuple[bool, str]:
        log = self.log("1-build")
        for cmd in (["nvidia-smi", "-L"], ["nvcc", "--version"], [os.environ.get("CXX", "c++"), "--version"],
                    [PY, "-c", "import sysconfig, torch; print('LDSHARED', sysconfig.get_config_var('LDSHARED')); "
                               "print('torch', torch.__version__, 'cuda', torch.version.cuda)"]):
            run(cmd, log, 30)
        with open(log, "a") as f:
            for var in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST",
                        "TRIPLETOPS_CUDA_ARCHS"):
                f.write(f"{var}={os.environ.get(var, '')}\n")
        wheels = sorted(glob.glob(os.path.join(self.wheels, "*.whl")))
        if wheels:
            run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels], log, self.left(60))
        start = time.monotonic()
        code, out = run([PY, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."], log,
                        self.left(limit) - 20, env={"MAX_JOBS": str(self.jobs)})
        refused = code != 0 and "defines libstdc++'s own functions" in out
        if refused:  # the build's own check refused the extension: build it anyway, to learn the rest
            code, out = run([PY, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."], log,
                            self.left(limit) - 20, env={"MAX_JOBS": str(self.jobs),
                                                        "TRIPLETOPS_ALLOW_LIBSTDCXX_COPY": "1"})
        seconds = time.monotonic() - start
        link = [line.strip() for line in out.splitlines() if "tripletops: link line" in line]
        archs = [line.strip() for line in out.splitlines() if "tripletops: CUDA code for" in line]
        so = glob.glob(os.path.join(ROOT, "tripletops", "_C*.so"))
        nm_count = "?"
        if so:
            run(f"nm -C --defined-only {so[0]} | grep -E '_M_insert|num_put|locale|codecvt' "
                            f"> {os.path.join(self.out, 'nm-libstdcxx.txt')}; wc -l < "
                            f"{os.path.join(self.out, 'nm-libstdcxx.txt')}", log, 30, shell=True)
            sys.path.insert(0, ROOT)
            import setup_support  # the same check as the build's and tests/test_native_errors.py's

            own = setup_support.libstdcxx_code_in(so[0])
            nm_count = f"{len(own)} of libstdc++'s own functions defined in _C" + (f" ({own[:3]})" if own else "")
            run(["ldd", so[0]], log, 30)
        _, info = run([PY, "-c", "import tripletops; print(tripletops.extension_available())"], log, 60)
        figures = ("REFUSED by the libstdc++-copy check, rebuilt with TRIPLETOPS_ALLOW_LIBSTDCXX_COPY=1; "
                   if refused else "") + (f"pip install {seconds:.0f} s with MAX_JOBS={self.jobs}; "
                   f"{archs[0].split(': ', 1)[-1] if archs else 'no CUDA code line'}; "
                   f"link line {'logged' if link else 'NOT logged'}; {nm_count}; "
                   f"{(info.strip().splitlines() or ['no extension_available() output'])[-1]}")
        return code == 0 and not refused and "devices=('cpu', 'cuda')" in info, figures

    # ---- (b) tests
    def tests(self, limit: float) -> Tuple[bool, str]:
        log = self.log("2-tests")
        has = subprocess.run([PY, "-c", "import xdist, pytest_timeout"], capture_output=True).returncode == 0
        cmd = [PY, "-m", "pytest", "tests", "-q", "-rfEs", "-p", "no:cacheprovider", "-m", "not cuda_emu and not slow",
               "-k", "cuda or native_errors or test_build or device_placement"]
        if has:
            cmd += ["-n", str(min(12, self.jobs)), "--timeout", "120"]
        code, out = run(cmd, log, self.left(limit), env={"TRIPLETOPS_STRICT": "1"})
        summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        return code == 0, (summary[-1].strip("= ") if summary else f"exit {code}, no pytest summary") + (
            "" if has else " (no pytest-xdist: serial)")

    # ---- (c) sanitizers
    def sanitizers(self, limit: float) -> Tuple[bool, str]:
        tools = ["memcheck", "racecheck", "synccheck", "initcheck"]
        exe = shutil.which("compute-sanitizer")
        if exe is None:
            return False, "compute-sanitizer not found"
        budget = self.left(limit)
        procs = {}
        for tool in tools:
            f = open(self.log(f"3-sanitizer-{tool}"), "w")
            procs[tool] = (subprocess.Popen([exe, "--tool", tool, "--error-exitcode", "1", PY,
                                             "tools/gpu_sanitize_driver.py"], cwd=ROOT, stdout=f,
                                            stderr=subprocess.STDOUT, text=True), f)
        deadline = time.monotonic() + budget
        figures, ok = [], True
        for tool, (p, f) in procs.items():
            try:
                code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                code = 124
            f.close()
            text = open(self.log(f"3-sanitizer-{tool}")).read()
            errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
            cases = re.findall(r"gpu_sanitize_driver: (\d+) cases", text)
            figures.append(f"{tool} {'timed out' if code == 124 else 'exit ' + str(code)}, "
                           f"{errors[-1] if errors else '?'} errors, {cases[-1] if cases else '?'} cases")
            ok &= code == 0
        return ok, "; ".join(figures)

    # ---- (d) benchmarks, (e) profile
    def benchmarks(self, limit: float) -> Tuple[bool, str]:
        budget = self.left(limit)
        code, out = run([PY, "benchmarks/gpu_targets.py", "--budget", str(max(10, budget - 25)), "--out",
                         os.path.join(self.out, "targets.txt")], self.log("4-benchmarks"), budget)
        last = [line for line in out.splitlines() if line.startswith("gpu_targets:")]
        return code == 0, (last[-1] if last else f"exit {code}") + "; rows in targets.txt"

    def profile(self, limit: float) -> Tuple[bool, str]:
        code, out = run([PY, "benchmarks/gpu_targets.py", "--profile", "--out",
                         os.path.join(self.out, "kernel-profile.txt")], self.log("5-profile"), self.left(limit))
        tables = [line for line in out.splitlines() if line.startswith("## ")]
        return code == 0, f"{len(tables)} kernel tables in kernel-profile.txt"

    # ---- (e') ncu on the kernels the review named (issue 35): DRAM %, warps active, issue
    # active, the occupancy limiter. The second call of each case is profiled (the first
    # warms up); sections SpeedOfLight, Occupancy, SchedulerStats, LaunchStats.
    def ncu(self, limit: float) -> Tuple[bool, str]:
        tool = shutil.which("ncu")
        if tool is None:
            return False, "ncu not found"
        sections = [a for s in ("SpeedOfLight", "Occupancy", "SchedulerStats", "LaunchStats") for a in ("--section", s)]
        done = []
        for case, kernel, skip in (("bank", "mine_tile_kernel", 32), ("b8192", "ref_grad_kernel", 1),
                                   ("b8192", "mine_tile_kernel", 3), ("ball8192", "batch_all_stream_kernel", 2)):
            if self.left(limit) < 8:
                break
            out_file = os.path.join(self.out, f"ncu-{case}-{kernel}.txt")
            code, out = run([tool, "--clock-control", "none", "-k", f"regex:{kernel}", "--launch-skip", str(skip),
                             "--launch-count", "1", *sections, PY, "tools/ncu_driver.py", case],
                            self.log(f"5b-ncu-{case}-{kernel}"), self.left(limit))
            with open(out_file, "w") as f:
                f.write(out[-60000:])
            done.append(f"{case}/{kernel}: {'ok' if code == 0 else f'exit {code}'}")
        return bool(done) and all(d.endswith("ok") for d in done), "; ".join(done) + " (ncu-*.txt)"

    # ---- (f) training
    def training(self, limit: float) -> Tuple[bool, str]:
        out_dir = os.path.join(self.out, "train_digits_cuda")
        code, out = run([PY, "benchmarks/train_reference.py", "--device", "cuda", "--steps", "60", "--dtype", "float32",
                         "--no-progress", "--out", out_dir], self.log("6-training"), self.left(limit))
        for name in ("curves.png",):  # the plot is in the log's numbers already; keep the folder small
            path = os.path.join(out_dir, name)
            if os.path.exists(path):
                os.remove(path)
        same = "IDENTICAL TRAJECTORIES" in out
        speed = re.findall(r"loss forward \+ backward \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", out)
        figures = ("identical trajectories" if same else "trajectories NOT identical") + (
            f"; loss fwd+bwd {speed[0][0].strip()} vs eager {speed[0][1].strip()} ({speed[0][2].strip()})"
            if speed else "")
        return code == 0 and same, figures

    def stage(self, name: str, fn: Callable[[float], Tuple[bool, str]], limit: float) -> None:
        if self.left(limit) < 5:
            self.results.append((name, "SKIPPED", 0.0, f"the {self.total:.0f} s total was spent"))
            say(f"{name}: skipped (no time left)", self.progress)
            return
        say(f"{name}: start (limit {self.left(limit):.0f} s)", self.progress)
        start = time.monotonic()
        try:
            ok, figures = fn(limit)
        except Exception as exc:  # a broken stage is reported, the next one still runs
            ok, figures = False, f"{type(exc).__name__}: {exc}"
        seconds = time.monotonic() - start
        status = "pass" if ok else "FAIL"
        self.results.append((name, status, seconds, figures))
        say(f"{name}: {status} in {seconds:.0f} s: {figures}", self.progress)


def describe() -> Dict[str, str]:
    def cmd(args):
        try:
            return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"
    probe = cmd([PY, "-c", "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "
                           "'no CUDA GPU'); print(torch.__version__); print(torch.version.cuda)"]).splitlines()
    probe += ["?"] * (3 - len(probe))
    return {"device": probe[0], "torch": probe[1], "cuda": probe[2],
            "commit": cmd(["git", "rev-parse", "HEAD"]) + (" (with uncommitted changes)" if cmd(
                ["git", "status", "--porcelain", "--untracked-files=no"]) else ""),
            "nvcc": (cmd(["nvcc", "--version"]).splitlines() or ["?"])[-1],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cores": str(os.cpu_count())}


def main() -> int:
    ap = argparse.ArgumentParser(description="make gpu-check")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu-check"))
    ap.add_argument("--total", type=float, default=470.0, help="seconds for the whole run (8 minutes, less a margin)")
    ap.add_argument("--wheels", default=os.path.join(ROOT, ".whl"))
    # The performance picture first (issue 35): a run cut short still has the target rows
    # (with rescans and the largest hub) and the per-kernel profile.
    ap.add_argument("--stages", default="build,benchmarks,profile,ncu,tests,sanitizers,training")
    args = ap.parse_args()
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    jobs = os.cpu_count() or 2
    check = Check(args.out, args.total, args.wheels, jobs)
    limits = {"build": 150, "tests": 150, "sanitizers": 100, "benchmarks": 130, "profile": 45, "ncu": 45,
              "training": 60}
    say(f"gpu-check: stages {args.stages}, {args.total:.0f} s in all, results in {args.out}", check.progress)
    for name in args.stages.split(","):
        check.stage(name, getattr(check, name), limits[name])
    info = describe()
    lines = [f"# make gpu-check on {info['device']}", "",
             f"- device: {info['device']} ({info['cores']} CPU cores)",
             f"- torch {info['torch']}, CUDA {info['cuda']}; nvcc: {info['nvcc']}",
             f"- commit {info['commit']}", f"- run {info['date']}, {time.monotonic() - START:.0f} s in all", "",
             "| stage | result | seconds | key figures |", "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {s} | {t:.0f} | {fig.replace('|', '/')} |" for n, s, t, fig in check.results]
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(["", "gpu-check summary"] + lines[2:]), flush=True)
    return 0 if all(s == "pass" for _, s, _, _ in check.results) else 1


if __name__ == "__main__":
    sys.exit(main())
