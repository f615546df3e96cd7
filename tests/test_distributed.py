"""tripletops.distributed with 2 and 3 gloo processes on CPU, against one process on the
concatenated batch: losses (mean over ranks), gradients (divided by world size) and
mined indices, for every metric, reduction and soft margin, plus ties, empty
denominators, float32 and NaN."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tripletops
from dist_cases import CASES, batch, split

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _run_ranks(world: int, tmp_path, device: str = "cpu") -> list[dict]:
    init = tmp_path / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRIPLETOPS_DIST_DEVICE": device}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), str(r), str(world), str(init),
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, _run_ranks(world, tmp_path_factory.mktemp(f"world{world}"))


def _single_process(case):
    x, y = batch(case)
    x = x.clone().requires_grad_(True)
    kw = case["kwargs"]
    fn = case.get("fn", "batch_hard_loss")
    loss = getattr(tripletops, fn)(x, y, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    mined = tripletops.batch_hard_mine(x.detach(), y, metric=kw.get("metric", "euclidean"),
                                       normalize=kw.get("normalize", False))
    return loss.detach(), x.grad, mined


def _assert_same_picks(case, got, want):
    """Equal indices: mining is certified (docs/numerics.md), so each rank's picks against
    the gathered batch are the definition's, as are the single process's, ties included."""
    differ = torch.nonzero(got != want).flatten()
    assert len(differ) == 0, (case, got[differ], want[differ])


@pytest.mark.parametrize("name", [n for n in CASES if n != "nan"])
def test_matches_one_process_on_the_concatenated_batch(ranks, name):
    _check_against_one_process(*ranks, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_match_one_process(tmp_path):
    """Every case on CUDA tensors (2 gloo ranks on one GPU; the all-gather goes through host
    memory there, NCCL would take the tensors as they are) against one CPU process."""
    results = _run_ranks(2, tmp_path, device="cuda")
    for name in CASES:
        if name != "nan":
            _check_against_one_process(2, results, name)
    assert all(r["all_gather"]["gathered"].shape == (3, 3) for r in results)


def _check_against_one_process(world, results, name):
    case = CASES[name]
    loss, grad, mined = _single_process(case)
    tol = dict(rtol=1e-5, atol=1e-6) if case["data"] == "float32" else dict(rtol=1e-10, atol=1e-12)
    per_rank = [r[name] for r in results]
    if "pos_idx" in per_rank[0]:
        got_pos = torch.cat([r["pos_idx"] for r in per_rank])
        got_neg = torch.cat([r["neg_idx"] for r in per_rank])
        _assert_same_picks(case, got_pos, mined.pos_idx)
        _assert_same_picks(case, got_neg, mined.neg_idx)
    if case["kwargs"].get("reduction") == "none":
        # Unscaled per-anchor losses; backward of their sum gives the single-process gradient.
        torch.testing.assert_close(torch.cat([r["loss"] for r in per_rank]), loss, **tol)
        torch.testing.assert_close(torch.cat([r["grad"] for r in per_rank]), grad, **tol)
    else:
        torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), loss, **tol)
        torch.testing.assert_close(torch.cat([r["grad"] for r in per_rank]) / world, grad, **tol)
    lo_hi = split(len(grad), world)
    assert [len(r["grad"]) for r in per_rank] == [hi - lo for lo, hi in lo_hi]  # uneven batches


def test_empty_denominator_gives_zero_and_zero_gradients(ranks):
    _, results = ranks
    for name in ("no-valid-anchor", "no-valid-anchor-nonzero"):
        for r in results:
            assert r[name]["loss"].item() == 0.0
            assert torch.equal(r[name]["grad"], torch.zeros_like(r[name]["grad"]))


def test_nan_anywhere_gives_nan_on_every_rank(ranks):
    _, results = ranks
    assert all(torch.isnan(r["nan"]["loss"]) for r in results)


def test_all_gather_concatenates_in_rank_order_and_returns_gradients_to_owners(ranks):
    world, results = ranks
    counts = [r + 1 for r in range(world)]
    expected = torch.cat([torch.full((c, 3), float(r), dtype=torch.float64) for r, c in enumerate(counts)])
    weights = torch.arange(1, len(expected) + 1, dtype=torch.float64)[:, None].expand(-1, 3)
    start = 0
    for r, res in enumerate(results):
        assert torch.equal(res["all_gather"]["gathered"], expected)
        # Every rank's output used every row with the same weights: the owner gets world x them.
        assert torch.equal(res["all_gather"]["grad"], world * weights[start:start + counts[r]])
        start += counts[r]


def test_needs_an_initialized_process_group():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="init_process_group"):
        tripletops.distributed.batch_hard_loss(x, y)
    with pytest.raises(ValueError, match="reduction"):
        tripletops.distributed.batch_hard_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="'none' is not supported"):
        tripletops.distributed.contrastive_loss(x, y, reduction="none")
    with pytest.raises(RuntimeError, match="init_process_group"):
        tripletops.distributed.batch_all_loss(x, y)


@pytest.mark.parametrize("case", ["embeddings-dtype", "labels-dtype", "empty-rank", "labels-kind"])
def test_inputs_that_differ_or_fail_on_one_rank_raise_on_every_rank(ranks, case):
    """Ranks with different dtypes used to abort every process inside gloo, and a rank with
    B = 0 raised alone while the others hung: now every rank raises a ValueError."""
    _, results = ranks
    for fn in ("batch_hard_loss", "batch_all_loss"):
        messages = [r["errors"][f"{case}/{fn}"] for r in results]
        assert all(m is not None for m in messages), (case, fn, messages)
        if case == "empty-rank":
            assert "non-empty" in messages[1] and all("rank(s) [1]" in m for i, m in enumerate(messages) if i != 1)
        else:
            what = {"embeddings-dtype": "embeddings dtype", "labels-dtype": "labels dtype",
                    "labels-kind": "labels of the same kind"}[case]
            assert all(what in m for m in messages), messages


def test_a_call_leaves_nothing_to_gloo_and_ranks_exit_cleanly_under_load(tmp_path):
    """After a call returns or raises, gloo's worker thread must hold none of its tensors: it
    used to drop them just after the call had returned, and dropping one takes the GIL. If the
    process was exiting by then, that ended the thread inside C++ and aborted the process
    (SIGABRT), for a rank that raised the documented ValueError as for one that returned.
    Each rank checks that after 40 calls (a quarter of them left tensors held before), then
    exits at once without destroy_process_group and must exit with 0. The timing matters,
    so every core is kept busy meanwhile."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 2))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failures = []
    try:
        for round_, case in enumerate(("loss", "labels-dtype", "empty-rank", "loss", "labels-dtype", "empty-rank")):
            init = tmp_path / f"init{round_}"
            procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_exit_worker.py"), str(r), "2",
                                       str(init), case], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env) for r in range(2)]
            for r, p in enumerate(procs):
                out = p.communicate(timeout=300)[0]
                expected = "loss and backward done" if case == "loss" else "raised tripletops"
                if p.returncode != 0 or expected not in out or "left a tensor held: 0 of 40" not in out:
                    failures.append(f"round {round_} ({case}), rank {r}: exit {p.returncode}\n{out}")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert not failures, "\n".join(failures)
