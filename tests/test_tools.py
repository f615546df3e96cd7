"""The tooling around the kernels: the benchmark harness's memory measurement, the
comparison report, and the reference training script (short runs on every data source)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare  # noqa: E402
import harness  # noqa: E402


def test_peak_memory_counts_a_transient_allocation():
    def fn():
        a = torch.ones(1 << 20)          # 4 MiB, freed before b exists
        del a
        b = torch.ones(1 << 19)          # 2 MiB
        return b.sum()

    peak = harness.peak_memory_bytes(fn, "cpu")
    assert 4 << 20 <= peak < 5 << 20, peak


def _bench(family, impl, mode, b, d, median, peak, device="cpu"):
    return {"stats": {"median": median}, "extra_info": {
        "family": family, "impl": impl, "mode": mode, "B": b, "D": d, "device": device, "peak_bytes": peak,
        "device_name": "test cpu", "torch": torch.__version__, "threads": 2}}


def test_compare_writes_tables_plot_and_readme(tmp_path):
    run = {"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "benchmarks": [
        _bench("batch_hard", "tripletops", "fwd+bwd", 256, 128, 1e-4, 1 << 20),
        _bench("batch_hard", "eager", "fwd+bwd", 256, 128, 6e-4, 8 << 20),
        _bench("batch_hard", "pml", "fwd+bwd", 256, 128, 2e-3, 9 << 20),
        _bench("batch_hard", "tripletops", "fwd+bwd", 512, 128, 3e-4, 2 << 20),
        _bench("batch_hard", "eager", "fwd+bwd", 512, 128, 9e-4, 30 << 20),
        _bench("batch_hard", "gemm", "gemm", 256, 128, 5e-5, 0),
        _bench("triplet_margin", "tripletops", "fwd", 256, 128, 2e-5, 0),
        _bench("triplet_margin", "eager", "fwd", 256, 128, 1e-5, 4096),
    ]}
    src = tmp_path / "run.json"
    src.write_text(json.dumps(run))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- perf:begin -->\nold\n<!-- perf:end -->\ntail\n")
    sys.argv = ["compare.py", str(src), "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"),
                "--readme", str(readme)]
    compare.main()
    md = (tmp_path / "r.md").read_text()
    assert "| 256, 128 | 100 µs | 600 µs | 2.00 ms | 50 µs | 6.0× | 20.0× | 2.00 |" in md
    assert "B=256, D=128, fp32: ≥ 5× faster than eager | 6.0×" in md and "| met |" in md
    assert "| 256, 128 | 20 µs | 10 µs | 0.5× |" in md  # slower than a peer is shown, not hidden
    assert "| 512, 128 | 2.00 MiB | 30 MiB | — |" in md
    assert (tmp_path / "r.png").stat().st_size > 10_000
    text = readme.read_text()
    assert "old" not in text and "6.0×" in text and text.endswith("<!-- perf:end -->\ntail\n")


import train_reference  # noqa: E402


def _train(tmp_path, *extra):
    return train_reference.main(["--steps", "4", "--batch-size", "16", "--k", "4", "--no-progress",
                                 "--out", str(tmp_path / "out"), *extra])


def test_training_script_on_digits_is_identical_and_writes_results(tmp_path, capsys):
    res = _train(tmp_path)
    out = capsys.readouterr().out
    assert "IDENTICAL TRAJECTORIES: all 4 steps" in out and res["identical"]
    assert res["max_rel_loss_diff"] < 1e-12  # float64 by default
    assert set(res["runs"]) == {"tripletops", "eager reference"}
    for run in res["runs"].values():
        assert len(run["loss"]) == 4 and all(np.isfinite(run["loss"]))
        assert all(t > 0 for t in run["loss_time_s"] + run["step_time_s"])
    r = res["retrieval"]["before"]
    assert 0 < r["recall@1"] <= 1 and 0 < r["map@r"] <= 1
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["identical"] and (tmp_path / "out" / "curves.png").stat().st_size > 10_000
    summary = (tmp_path / "out" / "summary.md").read_text()  # what make demo-results copies into the README
    assert "multi-label" not in summary and "shares a label" not in summary
    assert "Retrieval on the 3 held-out classes" in summary


@pytest.mark.parametrize("bank", [False, True])
def test_training_script_multi_label_mode(tmp_path, capsys, bank):
    """Digits with overlapping label groups ("even", "≥ 5", "prime" beside the digit):
    multi-hot labels in both runs, identical trajectories, retrieval scored by shared
    labels (and with a bank: a CrossBatchMemory of multi-hot labels)."""
    res = _train(tmp_path, "--multi-label", *(("--bank-size", "300") if bank else ()))
    out = capsys.readouterr().out
    assert res["identical"] and res["config"]["multi_label"]
    assert "multi-label: L = 13 labels" in out and "relevant: shares a label" in out
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "multi-label (L = 13)" in summary and "relevant: shares a label with the query" in summary
    assert ("bank 300" in summary) is bank
    r = res["retrieval"]["before"]
    assert 0 < r["map@r"] < 1  # held-out images of every class: relevance is not all-or-nothing


def test_training_script_bank_mode(tmp_path):
    res = _train(tmp_path, "--bank-size", "300", "--dtype", "float32")
    assert res["identical"] and res["config"]["bank_size"] == 300
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "bank 300" in summary and "multi-label" not in summary and "shares a label" not in summary
    assert all(v > 0 for v in res["loss_peak_bytes"].values())


def _images(n_classes=4, per_class=12, size=8, seed=0):
    g = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    images = g.random((len(labels), size, size)).astype(np.float32) * 0.3
    for c in range(n_classes):  # a class-specific bright stripe, so classes differ
        images[labels == c, c % size, :] += 0.7
    return images, labels


def test_training_script_reads_npz(tmp_path):
    images, labels = _images()
    path = tmp_path / "data.npz"
    np.savez(path, images=(images * 255).astype(np.uint8)[..., None], labels=labels * 10)  # NHWC, uint8, odd labels
    res = _train(tmp_path, "--data", str(path), "--train-classes", "0.5")
    assert res["identical"]


def test_training_script_reads_an_image_folder(tmp_path):
    from PIL import Image

    images, labels = _images()
    for i, (im, c) in enumerate(zip(images, labels)):
        folder = tmp_path / "photos" / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((im.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "photos" / "class_0" / "notes.txt").write_text("not an image")
    loaded, y, names = train_reference.load_data(str(tmp_path / "photos"), 16)
    assert loaded.shape == (len(labels), 1, 16, 16) and names == [f"class_{c}" for c in range(4)]
    assert torch.equal(y, torch.tensor(labels))
    res = _train(tmp_path, "--data", str(tmp_path / "photos"), "--image-size", "16", "--train-classes", "0.5")
    assert res["identical"]


def test_training_script_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--data"):
        train_reference.load_data(str(tmp_path / "missing.bin"), 8)
    with pytest.raises(SystemExit):
        train_reference.parse_args(["--steps", "0"])


def test_training_script_under_torchrun_equals_one_process(tmp_path):
    import subprocess

    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "benchmarks", "train_reference.py"), "--steps", "3", "--batch-size", "15", "--k", "3",
           "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "IDENTICAL TRAJECTORIES: all 3 steps" in res.stdout and "2 processes" in res.stdout
    saved = json.loads((out / "results.json").read_text())
    assert saved["identical"] and set(saved["runs"]) == {"tripletops.distributed", "eager reference"}


def test_the_gpu_sanitizer_driver_runs_every_case_on_the_cpu():
    """tools/gpu_sanitize_driver.py is what compute-sanitizer runs on a GPU: keep it in step
    with the API by running its cases here, on CPU tensors."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_sanitize_driver

    done = gpu_sanitize_driver.run_cases("cpu")
    assert len(done) == 19 and len(set(done)) == len(done)


def test_gpu_check_reports_every_stage_and_keeps_to_its_total(tmp_path):
    """A stage with no time left is reported as skipped, the summary names the commit."""
    import subprocess

    out = tmp_path / "gc"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out", str(out),
                          "--stages", "profile,training", "--total", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    summary = (out / "summary.md").read_text()
    assert "| profile | SKIPPED |" in summary and "| training | SKIPPED |" in summary
    assert "- commit " in summary and "torch " in summary
    assert res.stdout.strip().splitlines()[-1].startswith("| training | SKIPPED")


def test_cuda_perf_models_every_kernel_and_every_target_row():
    """make cuda-perf (without nvcc: the committed snapshot of ptxas' resources): every
    __global__ kernel has a block size and resources, and every target row's model is the
    sum of its kernels' lines."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import cuda_perf

    snapshot = json.load(open(cuda_perf.SNAPSHOT))
    kernels = cuda_perf.kernels_in_sources()
    assert len(kernels) >= 30
    assert not [k for k in kernels if k not in cuda_perf.THREADS], "a kernel without a block size in THREADS"
    assert not [k for k in kernels if k not in snapshot], "tools/cuda_resources_sm90.json misses a kernel: " \
        "python tools/cuda_perf.py --update-snapshot"
    variants = [ln.kernel + ln.variant for row in cuda_perf.target_rows() for ln in row.launches if ln.variant]
    assert not [v for v in variants if v not in snapshot], "a row's template instantiation has no resources"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_perf.py"), "--no-compile"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for k in kernels:
        assert f"| {k} |" in res.stdout
    sections = res.stdout.split("\n### ")[1:]
    assert len(sections) == len(cuda_perf.target_rows())
    for sec in sections:
        lines = [ln for ln in sec.splitlines() if ln.startswith("| ") and not ln.startswith(("| kernel", "| ---"))]
        summed = sum(float(ln.split("|")[6]) for ln in lines)
        model = float(re.search(r"\*\*Model: ([0-9.]+) ms\*\*", sec).group(1))
        assert abs(summed / 1e3 - model) <= 0.002 + 1e-3 * model, sec.splitlines()[0]
