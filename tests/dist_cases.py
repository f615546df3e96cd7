"""The cases shared by test_distributed.py and the rank processes of dist_worker.py."""
import torch

METRICS = ("euclidean", "sqeuclidean", "cosine")
REDUCTIONS = ("none", "sum", "mean", "mean_nonzero")


def _cases():
    cases = {}
    for metric in METRICS:
        for reduction in REDUCTIONS:
            for soft in (False, True):
                cases[f"{metric}-{reduction}-{'soft' if soft else 'hinge'}"] = {
                    "data": "random", "kwargs": {"metric": metric, "reduction": reduction, "soft_margin": soft}}
    cases["normalize"] = {"data": "random", "kwargs": {"normalize": True, "margin": 0.5}}
    cases["ties"] = {"data": "integer", "kwargs": {"margin": 1.0, "reduction": "sum"}}
    cases["exact-ties"] = {"data": "integer-centered", "kwargs": {"margin": 1.0, "reduction": "sum"}}
    cases["no-valid-anchor"] = {"data": "distinct", "kwargs": {"reduction": "mean"}}
    cases["no-valid-anchor-nonzero"] = {"data": "distinct", "kwargs": {"reduction": "mean_nonzero"}}
    cases["float32"] = {"data": "float32", "kwargs": {"margin": 0.3}}
    cases["nan"] = {"data": "nan", "kwargs": {}}
    cases["multi-hot"] = {"data": "multi-hot", "kwargs": {"margin": 0.3}}
    cases["multi-hot-batch_all"] = {"data": "multi-hot", "fn": "batch_all_loss", "kwargs": {"margin": 0.3}}
    for fn, kwargs in (("batch_all_loss", {"margin": 0.3, "reduction": "mean_nonzero"}),
                       ("batch_all_loss", {"margin": 0.3, "reduction": "mean", "soft_margin": True}),
                       ("semi_hard_loss", {"margin": 0.5, "metric": "cosine"}),
                       ("contrastive_loss", {"neg_margin": 1.5, "reduction": "mean"}),
                       ("contrastive_loss", {"neg_margin": 1.5, "metric": "sqeuclidean", "reduction": "sum"})):
        name = f"{fn}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())
        cases[name] = {"data": "random", "fn": fn, "kwargs": kwargs}
    return cases


CASES = _cases()
N = 23  # the global batch; the ranks get uneven slices of it


def split(n: int, world: int):
    """Uneven, non-empty slices: rank r gets about (r + 1) parts of n."""
    weights = [r + 1 for r in range(world)]
    bounds, acc = [0], 0
    for w in weights:
        acc += w
        bounds.append(round(n * acc / sum(weights)))
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


def batch(case):
    """The global (embeddings, labels) of a case, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    kind = case["data"]
    y = torch.randint(0, 6, (N,), generator=g)
    y[-1] = 99  # a class with a single member: an anchor without a positive
    if kind == "integer":   # small integers: many exact distance ties (off-centre: mined on rounded keys)
        x = torch.randint(-2, 3, (N, 4), generator=g).double()
    elif kind == "integer-centered":  # mean exactly 0: no centering, Gram-form keys exact, ties exact
        half = torch.randint(-2, 3, (N // 2, 4), generator=g).double()
        x = torch.cat([half, -half, torch.zeros(N - 2 * (N // 2), 4, dtype=torch.float64)])
    elif kind == "distinct":
        x, y = torch.randn(N, 5, generator=g, dtype=torch.float64), torch.arange(N)
    elif kind == "float32":
        x = torch.randn(N, 7, generator=g)
    elif kind == "multi-hot":  # 70 labels (two words), about two per row; row 0 has none
        x = torch.randn(N, 7, generator=g, dtype=torch.float64)
        y = torch.rand(N, 70, generator=g) < 0.03
        y[0] = False
    else:
        x = torch.randn(N, 7, generator=g, dtype=torch.float64)
        if kind == "nan":
            x[3, 2] = float("nan")
    return x, y


# Per-rank inputs that must fail on every rank alike: (rank) -> (embeddings, labels).
ERROR_CASES = {
    "embeddings-dtype": lambda r: (torch.randn(4, 3, dtype=torch.float64 if r == 0 else torch.float32),
                                   torch.arange(4) // 2),
    "labels-dtype": lambda r: (torch.randn(4, 3), (torch.arange(4) // 2).to(torch.int32 if r == 0 else torch.int64)),
    "empty-rank": lambda r: (torch.randn(0 if r == 1 else 4, 3), torch.arange(0 if r == 1 else 4) // 2),
    "labels-kind": lambda r: (torch.randn(4, 3), torch.ones(4, 5 if r == 0 else 6, dtype=torch.bool)),
}
