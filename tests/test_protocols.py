"""reid_metrics (CMC/mAP/mINP, the Market-1501 protocol) and verification_metrics (TAR@FAR
over all pairs): against fast-reid's and torchreid's own eval_market1501 on the full
distance matrix, against a float64 reference with stable ranking where rows tie, and
against scikit-learn's roc_curve on the materialised pairs."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings

import numpy as np
import pytest
import torch

import tripletops
from test_training_edges import peak_bytes

# The protocols are PyTorch operations (no kernel of their own): CPU, and CUDA where a GPU is.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]
METRICS = ["euclidean", "sqeuclidean", "cosine"]


def _load_rank(dist: str, rel: str):
    """The package's rank.py alone (its __init__ pulls in the whole training stack). The
    Makefile installs fastreid and torchreid without their dependencies, as test-only
    reference code."""
    try:
        path = importlib.metadata.distribution(dist).locate_file(rel)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (make install puts it in the project's environment)")
    spec = importlib.util.spec_from_file_location(f"_{dist}_rank", str(path))
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython rank evaluation is unavailable"
        spec.loader.exec_module(module)
    return module


def reid_data(seed, Q=60, G=500, D=16, ids=30, cams=4, noise=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    gid = torch.randint(0, ids, (G,), generator=g)  # host tensor
    gcam = torch.randint(0, cams, (G,), generator=g)  # host tensor
    qid = torch.randint(0, ids + 5, (Q,), generator=g)  # host tensor; some identities are absent from the gallery
    qcam = torch.randint(0, cams, (Q,), generator=g)  # host tensor
    centres = 2.0 * torch.randn(ids + 5, D, generator=g)  # host tensor
    q = centres[qid] + noise * torch.randn(Q, D, generator=g)  # host tensor
    ga = centres[gid] + noise * torch.randn(G, D, generator=g)  # host tensor
    return [t.to(device) for t in (q, qid, qcam, ga, gid, gcam)]


def exact_keys64(a, b, metric):
    """float64 keys as the library defines its exact distances: |a − b|² from the
    difference (canonical unit rows for cosine, halved to 1 − cos), Q x G."""
    a, b = a.double().cpu(), b.double().cpu()
    if metric == "cosine":
        def unit(x):
            m = x.abs().amax(1, keepdim=True)
            p = x / m
            return p / p.norm(dim=1, keepdim=True)
        a, b = unit(a), unit(b)
    d = a[:, None, :] - b[None, :, :]
    k = torch.linalg.vecdot(d, d)
    if metric == "cosine":
        return k / 2
    return k.sqrt() if metric == "euclidean" else k


def stable_market(dist, qid, gid, qcam, gcam, max_rank):
    """Market-1501 metrics with ties ranked by gallery index (stable argsort)."""
    cmc, aps, inps = [], [], []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((gid[order] == qid[i]) & (gcam[order] == qcam[i]))
        raw = (gid[order] == qid[i])[keep].astype(np.int64)
        if not raw.any():
            continue
        ranks = np.nonzero(raw)[0] + 1
        curve = np.zeros(max_rank)
        curve[ranks[0] - 1:] = 1.0
        cmc.append(curve)
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
    return np.mean(cmc, 0), float(np.mean(aps)), float(np.mean(inps)), len(aps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [0, 1])
def test_reid_matches_fastreid_and_torchreid(device, metric, seed):
    fr = _load_rank("fastreid", "fastreid/evaluation/rank.py")
    tr = _load_rank("torchreid", "torchreid/reid/metrics/rank.py")
    q, qid, qcam, g, gid, gcam = reid_data(seed, device=device)
    out = tripletops.reid_metrics(q, qid, qcam, g, gid, gcam, metric=metric, max_rank=20)
    dist = exact_keys64(q, g, metric).numpy()
    args = (qid.cpu().numpy(), gid.cpu().numpy(), qcam.cpu().numpy(), gcam.cpu().numpy(), 20)
    cmc, ap, inp = fr.eval_market1501(dist, *args)
    cmc_t, map_t = tr.eval_market1501(dist, *args)
    assert out["num_valid_queries"] == len(ap) < q.shape[0]  # some queries are skipped
    assert out["cmc"].shape == (20,) and out["cmc"].dtype == torch.float64
    np.testing.assert_allclose(out["cmc"].numpy(), cmc, atol=1e-6)
    np.testing.assert_allclose(out["cmc"].numpy(), cmc_t, atol=1e-6)
    assert abs(out["mAP"] - float(np.mean(ap))) < 1e-6 and abs(out["mAP"] - float(map_t)) < 1e-6
    assert abs(out["mINP"] - float(np.mean(inp))) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_reid_ties_go_to_the_smallest_gallery_index(device, metric):
    """Integer rows and duplicated rows: many exact ties, where argsort's order is not
    defined; the float64 reference ranks them by gallery index."""
    g = torch.Generator().manual_seed(3)
    G, Q, D = 400, 50, 6
    ga = torch.randint(-2, 3, (G, D), generator=g).float()  # host tensor
    ga[200:300] = ga[:100]  # duplicates
    gid = torch.randint(0, 20, (G,), generator=g)  # host tensor
    gcam = torch.randint(0, 3, (G,), generator=g)  # host tensor
    q = torch.cat([ga[:25], torch.randint(-2, 3, (Q - 25, D), generator=g).float()])  # host tensor
    q[q.abs().sum(1) == 0] = 1.0  # no zero row under cosine
    ga[ga.abs().sum(1) == 0] = 1.0
    qid = torch.randint(0, 20, (Q,), generator=g)  # host tensor
    qcam = torch.randint(0, 3, (Q,), generator=g)  # host tensor
    out = tripletops.reid_metrics(*(t.to(device) for t in (q, qid, qcam, ga, gid, gcam)), metric=metric,
                                  max_rank=30)
    dist = exact_keys64(q, ga, metric).numpy()
    cmc, mAP, mINP, n = stable_market(dist, qid.numpy(), gid.numpy(), qcam.numpy(), gcam.numpy(), 30)
    assert out["num_valid_queries"] == n
    np.testing.assert_allclose(out["cmc"].numpy(), cmc, rtol=0, atol=1e-12)
    assert abs(out["mAP"] - mAP) < 1e-12 and abs(out["mINP"] - mINP) < 1e-12


def test_reid_near_ties_far_from_the_origin(monkeypatch):
    """Rows at 1e4 from the origin whose distances differ by ~1e-3, and as many at −1e4
    (so the centre does not help): the GEMM form cannot order them in fp32 (its keys round
    at ~1e-1 there), the exact comparison does, and it runs."""
    import tripletops.protocols as protocols

    calls = []
    real = protocols._count_exactly
    monkeypatch.setattr(protocols, "_count_exactly", lambda *a: (calls.append(a[2].numel()), real(*a)))
    g = torch.Generator().manual_seed(5)
    D, G = 32, 300
    base = torch.full((D,), 1e4)
    ga = base + torch.randn(G, D, generator=g).mul(1e-3)
    ga[G // 2:] -= 2 * base
    gid = torch.arange(G) % 7
    gcam = torch.arange(G) % 3
    q = base[None, :].repeat(10, 1) + torch.randn(10, D, generator=g).mul(1e-3)
    qid = torch.arange(10) % 7
    qcam = (torch.arange(10) + 1) % 3
    out = tripletops.reid_metrics(q, qid, qcam, ga, gid, gcam, max_rank=10)
    assert sum(calls) > 100  # most near rows were placed on exact keys
    dist = exact_keys64(q, ga, "sqeuclidean").numpy()  # the keys: sqrt would merge some
    cmc, mAP, mINP, n = stable_market(dist, qid.numpy(), gid.numpy(), qcam.numpy(), gcam.numpy(), 10)
    np.testing.assert_allclose(out["cmc"].numpy(), cmc, atol=1e-12)
    assert abs(out["mAP"] - mAP) < 1e-12 and abs(out["mINP"] - mINP) < 1e-12
    assert mAP < 0.9  # the near rows are genuinely interleaved


def test_reid_max_rank_past_the_gallery_and_skipped_queries():
    q = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]])
    qid, qcam = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0])
    g = torch.tensor([[0.1, 0.0], [1.0, 0.0], [0.0, 0.2], [5.0, 5.1]])
    gid, gcam = torch.tensor([1, 2, 1, 2]), torch.tensor([1, 1, 0, 0])
    # query 0: its match is row 0 (rank 1); row 2 is its identity on its own camera (left out).
    # query 1: its match is row 1 (rank 1 among the kept rows 0, 1, 2: 6.40 < 6.93 < 7.00);
    # row 3 is its identity on its own camera (left out).
    # query 2: identity 3 is not in the gallery: skipped.
    out = tripletops.reid_metrics(q, qid, qcam, g, gid, gcam, max_rank=8)
    assert out["num_valid_queries"] == 2
    assert out["cmc"].tolist() == [1.0] * 8  # past the 3 kept rows, 1.0
    assert out["mAP"] == 1.0 and out["mINP"] == 1.0
    with pytest.raises(ValueError, match="no query has a match"):
        tripletops.reid_metrics(q[2:], qid[2:], qcam[2:], g, gid, gcam)


def test_reid_errors_name_the_argument():
    q, qid, qcam, g, gid, gcam = reid_data(0, Q=5, G=20)
    with pytest.raises(ValueError, match="metric"):
        tripletops.reid_metrics(q, qid, qcam, g, gid, gcam, metric="manhattan")
    with pytest.raises(ValueError, match="query_cams"):
        tripletops.reid_metrics(q, qid, qcam[:3], g, gid, gcam)
    with pytest.raises(TypeError, match="gallery_ids"):
        tripletops.reid_metrics(q, qid, qcam, g, gid.float(), gcam)
    with pytest.raises(TypeError, match="gallery"):
        tripletops.reid_metrics(q, qid, qcam, g.double(), gid, gcam)
    with pytest.raises(ValueError, match="max_rank"):
        tripletops.reid_metrics(q, qid, qcam, g, gid, gcam, max_rank=0)
    bad = g.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="gallery row 3"):
        tripletops.reid_metrics(q, qid, qcam, bad, gid, gcam)


def test_reid_memory_at_msmt17_size():
    """Q = 11,659 against G = 82,161 (D = 256, CPU): the peak stays under 10 % of one Q x G
    fp32 matrix (3.8 GB)."""
    g = torch.Generator().manual_seed(0)
    Q, G, D, ids = 11659, 82161, 256, 3000
    centres = torch.randn(ids, D, generator=g)
    gid = torch.randint(0, ids, (G,), generator=g)
    qid = torch.randint(0, ids, (Q,), generator=g)
    gal = centres[gid] + 0.5 * torch.randn(G, D, generator=g)
    qry = centres[qid] + 0.5 * torch.randn(Q, D, generator=g)
    gcam, qcam = torch.randint(0, 15, (G,), generator=g), torch.randint(0, 15, (Q,), generator=g)
    out = {}
    peak = peak_bytes(lambda: out.update(r=tripletops.reid_metrics(qry, qid, qcam, gal, gid, gcam)), "cpu")
    assert out["r"]["num_valid_queries"] > 0.9 * Q
    assert peak < 0.1 * Q * G * 4, f"peak {peak / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- verification
def roc_reading(dist, genuine, far):
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(genuine, -dist, drop_intermediate=False)
    j = np.nonzero(fpr <= far)[0][-1]
    return tpr[j], -thr[j + 1]


def pairs_of(x, labels, metric):
    n = x.shape[0]
    iu = torch.triu_indices(n, n, 1)
    d = exact_keys64(x, x, metric)[iu[0], iu[1]].numpy()
    if labels.dim() == 1:
        gen = (labels[iu[0]] == labels[iu[1]]).numpy()
    else:
        gen = (labels[iu[0]] & labels[iu[1]]).any(1).numpy()
    return d, gen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,classes", [(300, 40), (1100, 150)])
def test_verification_equals_sklearn_roc(device, metric, n, classes):
    g = torch.Generator().manual_seed(n + len(metric))
    d = 16
    y = torch.randint(0, classes, (n,), generator=g)  # host tensor
    x = torch.randn(classes, d, generator=g)[y] + 0.7 * torch.randn(n, d, generator=g)  # host tensor
    far = (1e-5, 1e-4, 1e-3, 1e-2, 0.1)
    out = tripletops.verification_metrics(x.to(device), y.to(device), far=far, metric=metric)
    dist, gen = pairs_of(x, y, metric)
    assert out["far"] == far
    assert out["num_genuine"] == int(gen.sum()) and out["num_impostor"] == int((~gen).sum())
    for i, f in enumerate(far):
        tar, thr = roc_reading(dist, gen, f)
        assert out["tar"][i].item() == tar, (f, out["tar"][i].item(), tar)
        assert out["thresholds"][i].item() == thr, (f, out["thresholds"][i].item(), thr)


def test_verification_ties_and_multi_hot_labels():
    """Integer rows (many equal distances, counted separately) and multi-hot labels
    (genuine = a label in common)."""
    g = torch.Generator().manual_seed(9)
    n = 500
    x = torch.randint(-2, 3, (n, 5), generator=g).float()
    x[x.abs().sum(1) == 0] = 1.0
    labels = torch.rand(n, 12, generator=g) < 0.12
    for metric in METRICS:
        far = (1e-3, 1e-2, 0.05)
        out = tripletops.verification_metrics(x, labels, far=far, metric=metric)
        dist, gen = pairs_of(x, labels, metric)
        for i, f in enumerate(far):
            tar, thr = roc_reading(dist, gen, f)
            assert out["tar"][i].item() == tar and out["thresholds"][i].item() == thr, (metric, f)


def test_verification_errors():
    x = torch.randn(10, 4)
    y = torch.arange(10) % 3
    with pytest.raises(ValueError, match="far"):
        tripletops.verification_metrics(x, y, far=(0.0,))
    with pytest.raises(ValueError, match="far"):
        tripletops.verification_metrics(x, y, far=(1.5,))
    with pytest.raises(TypeError, match="far"):
        tripletops.verification_metrics(x, y, far=1e-3)
    with pytest.raises(ValueError, match="no genuine pair"):
        tripletops.verification_metrics(x, torch.arange(10))
    with pytest.raises(ValueError, match="no impostor pair"):
        tripletops.verification_metrics(x, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="metric"):
        tripletops.verification_metrics(x, y, metric="l1")
    with pytest.raises(ValueError, match="at least 2"):
        tripletops.verification_metrics(x[:1], y[:1])
    with pytest.raises(ValueError, match="labels"):
        tripletops.verification_metrics(x, y[:4])


def test_training_script_reports_cmc_and_map_with_cameras():
    """The training script's retrieval report prints the re-ID protocol when camera ids
    exist (a synthetic camera id here: the digits data has none)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import train_reference

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 6
    images = torch.randn(6, 8, generator=g)[labels] + 0.3 * torch.randn(60, 8, generator=g)
    cams = (torch.arange(60) // 6) % 3  # each identity on every camera
    model = torch.nn.Identity()
    out = train_reference.retrieval_metrics(model, images, labels, "cpu", cams=cams)
    ref = tripletops.reid_metrics(images.double(), labels, cams, images.double(), labels, cams, max_rank=5)
    assert out["cmc@1"] == float(ref["cmc"][0]) and out["reid_map"] == ref["mAP"]
    assert 0.5 < out["reid_map"] <= 1.0 and "recall@1" in out
    assert "cmc@1" not in train_reference.retrieval_metrics(model, images, labels, "cpu")
