"""Reference training script: the same metric-learning run twice from one seed, once with
`tripletops.batch_hard_loss` and once with the eager reference
(`tripletops.reference.batch_hard_loss`), in lockstep, to show that the trajectories are
identical and how much time (and, against a memory bank, memory) the fused loss saves.

    python benchmarks/train_reference.py                      # digits, CPU or CUDA, defaults
    python benchmarks/train_reference.py --bank-size 65536    # cross-batch memory mode
    python benchmarks/train_reference.py --data photos/       # one subfolder per class
    python benchmarks/train_reference.py --data data.npz      # arrays "images" and "labels"
    torchrun --nproc_per_node=2 benchmarks/train_reference.py  # split across processes (DDP)

Data: by default scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes,
shipped inside the package, so it runs offline). The first `--train-classes` fraction of
the classes trains; retrieval (Recall@1, mAP@R) is evaluated on the held-out rest before
and after training.

Each step draws a P×K batch (P classes × K images, with a random ±1 pixel shift), embeds
it with a small CNN (L2-normalized output), and takes an Adam step on the batch-hard
loss. Both runs start from the same weights and draw the same batches. Every step checks
that they mined the same triplets (same positive and negative index for every anchor)
and that their losses agree within --rtol; the first step where either fails is
reported.

Timing: the loss's forward + backward is timed on the embeddings detached from the
network (its gradient is then pushed through the network), and the whole step (data,
forward, loss, backward, optimizer) around it. The two runs alternate step by step, so
machine noise hits both alike.

With --bank-size M the reference set is a FIFO cross-batch memory of M past embeddings
(XBM, Wang et al. 2020; stored in a `tripletops.CrossBatchMemory`): filled before the
first step by embedding randomly drawn, shifted training images, and refreshed with each
step's batch after its update. The
eager loss builds a B×M distance matrix; the fused one never does. Peak memory of the
loss (forward + backward) is measured once for each.

With --multi-label every image carries several labels, as a (B, L) multi-hot tensor: its
class and the groups the class belongs to. On digits the groups are "even", "≥ 5" and
"prime" beside the digit itself (L = 13), so 2 and 8 share "even", 5 and 7 share "≥ 5"
and "prime", and 1 and 9 share nothing. Positives are the images that share at least one
label (the losses' multi-label semantics), and retrieval counts a neighbour as relevant
when it shares a label with the query. For other data (--data) the groups are
contiguous runs of classes (classes 0-1, 2-3, ...). Held out are then a random
`1 - --train-classes` of the images of every class (held-out digit classes 7-9 would all
share "≥ 5", and every neighbour would be relevant).

Under torchrun (WORLD_SIZE > 1; gloo on CPU, NCCL on CUDA) the first run is
`tripletops.distributed.batch_hard_loss` under DistributedDataParallel: every process
embeds its slice of the same P×K batch and mines it against the whole batch gathered
from all processes. The second run is the eager reference, trained by process 0 alone
on the whole batch. Identical trajectories then show that the split training equals
one-process training on the concatenated batch.

Outputs under --out: results.json (configuration, per-step losses and times, the
speedup table, retrieval metrics, memory), summary.md (what is printed at the end) and
curves.png (both runs' loss curves and step times).

Why float64 by default: two float32 trainings whose losses differ only by rounding
(~1e-7, different summation orders) drift apart as Adam, ReLU and max-pool kinks
amplify it; on digits their losses separate past 1e-5 relative after 66-132 steps. In
float64 rounding is 1e-16 and the runs stay identical. `--dtype float32` shows float32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tripletops  # noqa: E402
from tripletops import distributed as tdist  # noqa: E402
from tripletops import reference  # noqa: E402
from tripletops.reference import Mined  # noqa: E402

# ----------------------------------------------------------------------------- data


def load_data(source: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, C, H, W) float images in [0, 1], (N,) int64 labels, class names."""
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
        return images, torch.tensor(d.target, dtype=torch.int64), [str(c) for c in range(10)]
    if source.endswith(".npz"):
        with np.load(source) as z:
            images, labels = np.asarray(z["images"], dtype=np.float32), np.asarray(z["labels"])
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        if images.ndim != 4:
            raise ValueError(f"{source}: 'images' must be (N, H, W), (N, C, H, W) or (N, H, W, C), got {images.shape}")
        if images.max() > 1.0:
            images = images / 255.0
        names, inverse = np.unique(labels, return_inverse=True)
        return torch.from_numpy(images), torch.from_numpy(inverse.astype(np.int64)), [str(n) for n in names]
    if os.path.isdir(source):
        from PIL import Image

        names = sorted(e for e in os.listdir(source) if os.path.isdir(os.path.join(source, e)))
        images, labels = [], []
        for c, name in enumerate(names):
            folder = os.path.join(source, name)
            for f in sorted(os.listdir(folder)):
                try:
                    with Image.open(os.path.join(folder, f)) as im:
                        im = im.convert("L").resize((image_size, image_size), Image.BILINEAR)
                except OSError:
                    continue  # not an image
                images.append(np.asarray(im, dtype=np.float32) / 255.0)
                labels.append(c)
        if len(set(labels)) < 4:
            raise ValueError(f"{source}: need at least 4 class subfolders with images, found {len(set(labels))}")
        return torch.from_numpy(np.stack(images))[:, None], torch.tensor(labels), names
    raise ValueError(f"--data: expected 'digits', a .npz file or a folder of class subfolders, got {source!r}")


DIGIT_GROUPS = {"even": (0, 2, 4, 6, 8), "≥ 5": (5, 6, 7, 8, 9), "prime": (2, 3, 5, 7)}


def multi_label_table(names: list[str], source: str) -> tuple[torch.Tensor, list[str]]:
    """(classes, L) bool: each class's own label and the groups it belongs to, and the
    labels' names. Digits: the digit, then "even", "≥ 5", "prime". Other data: the
    class, then groups of two consecutive classes."""
    c = len(names)
    if source == "digits":
        groups = {g: members for g, members in DIGIT_GROUPS.items()}
    else:
        groups = {f"{names[i]}+{names[min(i + 1, c - 1)]}": (i, i + 1) for i in range(0, c, 2)}
    table = torch.zeros(c, c + len(groups), dtype=torch.bool)
    table[torch.arange(c), torch.arange(c)] = True
    for g, members in enumerate(groups.values()):
        for m in members:
            if m < c:
                table[m, c + g] = True
    return table, list(names) + list(groups)


def split_classes(labels: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the training rows (first `fraction` of the classes) and held-out rows."""
    classes = torch.unique(labels)
    n_train = min(len(classes) - 2, max(2, round(fraction * len(classes))))
    train = torch.isin(labels, classes[:n_train])
    return train, ~train


class PKSampler:
    """P classes × K distinct images per batch (with replacement only inside a class smaller than K),
    plus a random ±1 pixel shift, all drawn from its own seeded generator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, k: int, seed: int):
        self.images, self.labels = images, labels
        self.by_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
        self.p = max(2, min(len(self.by_class), batch_size // k))
        self.k = max(2, batch_size // self.p)
        self.g = torch.Generator().manual_seed(seed)

    def _k_of(self, members: torch.Tensor) -> torch.Tensor:
        """K distinct members of a class (with replacement only when it has fewer than K)."""
        if len(members) >= self.k:
            return members[torch.randperm(len(members), generator=self.g)[: self.k]]
        return members[torch.randint(len(members), (self.k,), generator=self.g)]

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def draw(self, n_batch: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if n_batch is None:
            classes = torch.randperm(len(self.by_class), generator=self.g)[: self.p]
            rows = [self._k_of(self.by_class[c]) for c in classes]
            idx = torch.cat(rows)
        else:
            idx = torch.randint(len(self.labels), (n_batch,), generator=self.g)
        return shift(self.images[idx], self.g), self.labels[idx]


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift every image by a random (dy, dx) in {-1, 0, 1}², zero-filled."""
    n, c, h, w = x.shape
    dy, dx = torch.randint(0, 3, (2, n), generator=g)
    padded = F.pad(x, (1, 1, 1, 1))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- model


class EmbeddingNet(nn.Module):
    """A small CNN: three conv layers (GroupNorm, ReLU, one max-pool), global average
    pooling, a linear head, L2-normalized. GroupNorm rather than BatchNorm: it does not
    depend on the batch, so training split across processes equals one process."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.GroupNorm(8, 32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(64, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


# ----------------------------------------------------------------------------- retrieval


@torch.no_grad()
def retrieval_metrics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str,
                      table: Optional[torch.Tensor] = None, cams: Optional[torch.Tensor] = None) -> dict:
    """Recall@1, Recall@5 and mAP@R (Musgrave et al. 2020) over the held-out rows, each row a
    query against all the others, by tripletops.retrieval_metrics (one exact knn search).
    With a multi-label `table`, a neighbour is relevant when it shares a label with the query.
    With camera ids `cams` (class-id labels), also the re-ID protocol's CMC@1, mAP and mINP
    (tripletops.reid_metrics, the rows against themselves: a row's own identity on its own
    camera, itself included, is left out). The digits data has no cameras."""
    model.eval()
    emb = torch.cat([model(images[i:i + 1024].to(device)) for i in range(0, len(images), 1024)]).double()
    model.train()
    labels = labels.to(device)
    y = labels if table is None else table.to(device)[labels].bool()
    m = tripletops.retrieval_metrics(emb, y, k=(1, 5))
    out = {"recall@1": m["recall_at_k"][1], "recall@5": m["recall_at_k"][5], "map@r": m["mean_average_precision_at_r"]}
    if cams is not None and table is None:
        c = cams.to(device)
        r = tripletops.reid_metrics(emb, labels, c, emb, labels, c, max_rank=5)
        out.update({"cmc@1": float(r["cmc"][0]), "reid_map": r["mAP"], "reid_minp": r["mINP"]})
    return out


# ----------------------------------------------------------------------------- one run


DISTRIBUTED = "tripletops.distributed"
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "tripletops": tripletops.batch_hard_loss,
    DISTRIBUTED: tdist.batch_hard_loss,
    "eager reference": reference.batch_hard_loss,
}
MINERS = {"tripletops": tripletops.batch_hard_mine, DISTRIBUTED: tdist.batch_hard_mine,
          "eager reference": reference.batch_hard_mine}


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s rows of a batch of n: contiguous, sizes differ by at most one."""
    return rank * n // world, (rank + 1) * n // world


@dataclass
class Run:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    sampler: PKSampler
    memory: Optional[tripletops.CrossBatchMemory] = None  # the XBM bank of --bank-size, kept full
    losses: list = field(default_factory=list)
    loss_times: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    last_batch: Optional[tuple] = None
    shard: Optional[tuple[int, int]] = None  # (rank, world): this process trains on its slice of each batch
    label_table: Optional[torch.Tensor] = None  # --multi-label: class -> (L,) multi-hot labels

    def labels_of(self, y: torch.Tensor) -> torch.Tensor:
        """The loss's labels for class ids y: the ids, or their multi-hot rows."""
        return y if self.label_table is None else self.label_table.to(y.device)[y]

    def loss_kwargs(self, margin: float) -> dict:
        kw = {"margin": margin}
        if self.bank is not None:
            kw.update(ref_embeddings=self.bank, ref_labels=self.bank_labels)
        return kw

    def step(self, device: str, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One timed training step; returns the loss's (embeddings, labels), detached.
        With a bank, the caller enqueues them afterwards (`enqueue`, a B-row copy)."""
        start = time.perf_counter()
        x, y = self.sampler.draw()
        if self.shard is not None:
            lo, hi = shard_bounds(len(y), *self.shard)
            x, y = x[lo:hi], y[lo:hi]
        x, y = x.to(device), self.labels_of(y.to(device))
        emb = self.model(x)
        leaf = emb.detach().requires_grad_(True)
        harness.synchronize(device)
        t0 = time.perf_counter()
        loss = LOSSES[self.name](leaf, y, **self.loss_kwargs(margin))
        loss.backward()
        harness.synchronize(device)
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        emb.backward(leaf.grad)
        self.opt.step()
        harness.synchronize(device)
        end = time.perf_counter()
        value = loss.detach().clone()
        if self.shard is not None:  # the mean over ranks is the single-process loss
            dist.all_reduce(value)
            value /= self.shard[1]
        self.losses.append(value.item())
        self.loss_times.append(t1 - t0)
        self.step_times.append(end - start)
        self.last_batch = (leaf.detach(), y)
        return leaf.detach(), y

    @property
    def bank(self) -> Optional[torch.Tensor]:
        return None if self.memory is None else self.memory.memory

    @property
    def bank_labels(self) -> Optional[torch.Tensor]:
        return None if self.memory is None else self.memory.memory_labels

    def enqueue(self, emb: torch.Tensor, y: torch.Tensor) -> None:
        self.memory.enqueue(emb, y)  # FIFO: overwrites the oldest rows


@torch.no_grad()
def fill_bank(run: Run, size: int, device: str, dim: int) -> None:
    n_labels = None if run.label_table is None else run.label_table.shape[1]
    run.memory = tripletops.CrossBatchMemory(size, dim, num_labels=n_labels)
    for start in range(0, size, 4096):
        n = min(4096, size - start)
        x, y = run.sampler.draw(n_batch=n)
        run.memory.enqueue(run.model(x.to(device)), run.labels_of(y.to(device)))


def loss_peak_memory(run: Run, device: str, margin: float) -> int:
    leaf, y = run.last_batch
    leaf = leaf.clone().requires_grad_(True)
    kw = run.loss_kwargs(margin)

    def fn():
        leaf.grad = None
        LOSSES[run.name](leaf, y, **kw).backward()

    return harness.peak_memory_bytes(fn, device)


def compare_triplets(mined: list, batch: tuple, bank: Optional[torch.Tensor], rtol: float = 1e-4) -> tuple[bool, int]:
    """Whether both runs mined the same triplets, up to the near-tie rule of docs/numerics.md: where an
    anchor's indices differ, the two picks must be at the same distance (within `rtol`
    relative, computed in float64 from the first run's rows), as with two copies of one
    image. Returns (same, number of anchors decided by such a tie)."""
    (pa, na), (pb, nb) = mined
    emb = batch[0].double()
    ref = emb if bank is None else bank.double()
    ties = 0
    for a_idx, b_idx in ((pa, pb), (na, nb)):
        differ = torch.nonzero(a_idx != b_idx).flatten()
        if len(differ) == 0:
            continue
        if bool(((a_idx[differ] < 0) | (b_idx[differ] < 0)).any()):
            return False, ties
        da = (emb[differ] - ref[a_idx[differ]]).norm(dim=1)
        db = (emb[differ] - ref[b_idx[differ]]).norm(dim=1)
        if not bool(((da - db).abs() <= rtol * torch.maximum(da, db)).all()):
            return False, ties
        ties += len(differ)
    return True, ties


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits", help="'digits' (default), a .npz with images/labels, or a folder")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64, help="P×K batch size (P classes × K images)")
    ap.add_argument("--k", type=int, default=8, help="images per class in a batch (K)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--dim", type=int, default=32, help="embedding dimension")
    ap.add_argument("--bank-size", type=int, default=0, help="cross-batch memory of M past embeddings (0: off)")
    ap.add_argument("--train-classes", type=float, default=0.7, help="fraction of the classes used for training")
    ap.add_argument("--image-size", type=int, default=32, help="side length images from a folder are resized to")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                    help="model, data and loss precision (see the module docstring for why float64 is the default)")
    ap.add_argument("--rtol", type=float, default=1e-5, help="relative loss agreement required at every step")
    ap.add_argument("--multi-label", action="store_true",
                    help="train on (B, L) multi-hot labels: each class plus the groups it belongs to")
    ap.add_argument("--out", default="runs/train_reference")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    ap.add_argument("--readme", help="also write the summary into this file, between "
                                     "<!-- train:NAME:begin --> and <!-- train:NAME:end -->, NAME = --out's last part")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 4 or args.k < 2 or args.bank_size < 0:
        ap.error("need --steps >= 1, --batch-size >= 4, --k >= 2, --bank-size >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return args


def make_run(name: str, args, images, labels, in_channels: int, table: Optional[torch.Tensor] = None) -> Run:
    torch.manual_seed(args.seed)  # identical initial weights for both runs
    model = EmbeddingNet(in_channels, args.dim).to(args.device, getattr(torch, args.dtype))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    return Run(name, model, opt, PKSampler(images, labels, args.batch_size, args.k, args.seed), label_table=table)


def median(xs):
    return float(np.median(xs)) if xs else float("nan")


def speedup_table(runs: list[Run], skip: int) -> tuple[list[dict], str]:
    a, b = runs
    rows = []
    for what, attr in (("loss forward + backward", "loss_times"), ("whole training step", "step_times")):
        ta, tb = median(getattr(a, attr)[skip:]), median(getattr(b, attr)[skip:])
        rows.append({"what": what, a.name: ta, b.name: tb, "speedup": tb / ta})
    lines = [f"| median per step (steps after the first {skip}) | {a.name} | {b.name} | speedup |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['what']} | {r[a.name] * 1e3:.3f} ms | {r[b.name] * 1e3:.3f} ms | {r['speedup']:.2f}× |" for r in rows]
    return rows, "\n".join(lines)


def plot_curves(runs: list[Run], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run, style in zip(runs, ("-", "--")):
        ax0.plot(run.losses, style, label=run.name)
        ax1.plot(np.array(run.step_times) * 1e3, style, lw=0.8, label=f"{run.name}: whole step")
        ax1.plot(np.array(run.loss_times) * 1e3, style, lw=0.8, label=f"{run.name}: loss fwd+bwd")
    ax0.set(xlabel="step", ylabel="batch-hard loss", title="loss (the two curves should coincide)")
    ax1.set(xlabel="step", ylabel="ms", yscale="log", title="time per step")
    for ax in (ax0, ax1):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def init_distributed(args) -> Optional[tuple[int, int]]:
    """Under torchrun (WORLD_SIZE > 1): join the process group; returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if args.bank_size:
        raise SystemExit("--bank-size is not supported with torchrun (yet): run it in one process")
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def gather_mined(m: Mined) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (pos_idx, neg_idx), concatenated in rank order (collective)."""
    both = tdist.all_gather(torch.stack([m.pos_idx, m.neg_idx], dim=1))
    return both[:, 0], both[:, 1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    shard = init_distributed(args)
    rank = shard[0] if shard else 0
    lead = rank == 0  # prints, runs the one-process reference, writes the results
    log = print if lead else (lambda *a, **k: None)
    device = args.device
    images, labels, names = load_data(args.data, args.image_size)
    images = images.to(getattr(torch, args.dtype))
    if args.multi_label:  # held-out classes would share "≥ 5" (digits 7-9): hold out images of every class instead
        test_mask = torch.rand(len(labels), generator=torch.Generator().manual_seed(args.seed)) < 1 - args.train_classes
        train_mask = ~test_mask
    else:
        train_mask, test_mask = split_classes(labels, args.train_classes)
    tr_x, tr_y, te_x, te_y = images[train_mask], labels[train_mask], images[test_mask], labels[test_mask]
    table, label_names = multi_label_table(names, args.data) if args.multi_label else (None, names)
    if shard is None:
        runs = [make_run(name, args, tr_x, tr_y, images.shape[1], table) for name in ("tripletops", "eager reference")]
    else:
        # tripletops.distributed under DDP in every process; the eager reference trains
        # in process 0 alone on the whole batch: what the split training must reproduce.
        ddp = make_run(DISTRIBUTED, args, tr_x, tr_y, images.shape[1], table)
        ddp.model = nn.parallel.DistributedDataParallel(ddp.model)
        ddp.shard = shard
        runs = [ddp] + ([make_run("eager reference", args, tr_x, tr_y, images.shape[1], table)] if lead else [])
    batch = runs[0].sampler.batch_size
    log(f"data: {args.data} — {len(images)} images {tuple(images.shape[1:])}, {len(names)} classes; "
        + (f"training on {len(tr_y)} images of all {len(torch.unique(tr_y))} classes, held out the other "
           f"{1 - args.train_classes:.0%} of each class ({len(te_y)} images)" if args.multi_label else
           f"training on {len(torch.unique(tr_y))} classes ({len(tr_y)} images), held out the other "
           f"{len(torch.unique(te_y))} classes ({len(te_y)} images)"))
    if table is not None:
        log(f"multi-label: L = {len(label_names)} labels per image ({', '.join(label_names)}); positives share one")
    log(f"device: {harness.describe_device(device)}; torch {torch.__version__}; "
        f"kernels: {tripletops.extension_available()}")
    log(f"batch: P={runs[0].sampler.p} classes × K={runs[0].sampler.k} = {batch}; steps {args.steps}; "
        f"bank {args.bank_size or 'off'}; seed {args.seed}; {args.dtype}"
        + (f"; {shard[1]} processes, {[b - a for a, b in (shard_bounds(batch, r, shard[1]) for r in range(shard[1]))]}"
           " rows each" if shard else ""))

    net = lambda run: getattr(run.model, "module", run.model)  # unwrap DDP
    before = retrieval_metrics(net(runs[0]), te_x, te_y, device, table)
    if args.bank_size:
        for run in runs:
            fill_bank(run, args.bank_size, device, args.dim)

    first_divergence, tie_steps = None, 0
    try:
        from tqdm import tqdm

        steps = tqdm(range(args.steps), desc="training (both runs in lockstep)", disable=args.no_progress or not lead)
    except ImportError:
        steps = range(args.steps)
    for step in steps:
        mined = []
        for run in runs:
            leaf, y = run.step(device, args.margin)
            # The triplets this step's loss used (mining is deterministic; not timed),
            # against the bank as it was before this step's embeddings join it.
            kw = {"ref_embeddings": run.bank, "ref_labels": run.bank_labels} if run.bank is not None else {}
            m = MINERS[run.name](leaf, y, **kw)
            mined.append(gather_mined(m) if run.shard else (m.pos_idx, m.neg_idx))
            if run.bank is not None:
                run.enqueue(leaf, y)
        if not lead:
            continue
        la, lb = runs[0].losses[-1], runs[1].losses[-1]
        same_triplets, ties = compare_triplets(mined, runs[-1].last_batch, runs[-1].bank)
        tie_steps += ties > 0
        close = abs(la - lb) <= args.rtol * max(abs(la), abs(lb), 1e-30)
        if first_divergence is None and not (same_triplets and close):
            first_divergence = {"step": step, "same_triplets": same_triplets, "losses": [la, lb],
                                "rel_diff": abs(la - lb) / max(abs(la), abs(lb), 1e-30)}
        if hasattr(steps, "set_postfix"):
            steps.set_postfix(loss=f"{la:.4f}", identical="yes" if first_divergence is None else "no")

    memory = {run.name: loss_peak_memory(run, device, args.margin) for run in runs}  # collective under torchrun
    if not lead:
        dist.destroy_process_group()
        return {}
    after = {run.name: retrieval_metrics(net(run), te_x, te_y, device, table) for run in runs}
    skip = min(5, args.steps - 1)
    rows, speed_table = speedup_table(runs, skip)  # not `table`: that is the label table
    max_rel = max(abs(a - b) / max(abs(a), abs(b), 1e-30) for a, b in zip(runs[0].losses, runs[1].losses))

    lines = [f"{args.data}, {args.steps} steps, batch {batch} (P={runs[0].sampler.p} × K={runs[0].sampler.k})"
             f"{f', bank {args.bank_size}' if args.bank_size else ''}, {args.dtype}, seed {args.seed}"
             f"{f', multi-label (L = {len(label_names)})' if table is not None else ''}"
             f"{f', {shard[1]} processes (torchrun; rank 0 shown)' if shard else ''}; "
             f"{harness.describe_device(device)}, torch {torch.__version__}.", ""]
    if first_divergence is None:
        lines.append(f"IDENTICAL TRAJECTORIES: all {args.steps} steps mined the same triplets and the losses agree "
                     f"within {args.rtol:g} relative (largest difference {max_rel:.2e}).")
        if tie_steps:
            lines.append(f"({tie_steps} steps had an anchor whose two runs picked different rows at the same distance, "
                         f"within 1e-4 relative: a tie, which docs/numerics.md lets go either way.)")
    else:
        d = first_divergence
        lines.append(f"TRAJECTORIES DIVERGED at step {d['step']}: same triplets: {d['same_triplets']}, losses "
                     f"{d['losses'][0]:.8g} vs {d['losses'][1]:.8g} (relative difference {d['rel_diff']:.2e}).")
    held_out = (f"{len(te_y)} held-out images of all {len(torch.unique(te_y))} classes (relevant: shares a label with "
                f"the query)" if table is not None else f"the {len(torch.unique(te_y))} held-out classes ({len(te_y)} images)")
    lines += ["", f"Retrieval on {held_out}:", "",
              "| model | Recall@1 | Recall@5 | mAP@R |", "| --- | --- | --- | --- |",
              f"| before training | {before['recall@1']:.4f} | {before['recall@5']:.4f} | {before['map@r']:.4f} |"]
    lines += [f"| after, {name} | {m['recall@1']:.4f} | {m['recall@5']:.4f} | {m['map@r']:.4f} |"
              for name, m in after.items()]
    lines += ["", "Time per step:", "", speed_table, ""]
    if shard:
        lines += ["Under torchrun these times are not a speed comparison: process 0 also trains the one-process "
                  "reference, and the other processes wait for it at every collective, inside the timed loss.", ""]
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    bxm = f" (a B×M {args.dtype} matrix alone: {batch * args.bank_size * elem / 2**20:.1f} MiB)" if args.bank_size else ""
    lines.append(f"Peak extra memory of the loss, forward + backward{bxm}: " +
                 ", ".join(f"{n} {v / 2**20:.2f} MiB" for n, v in memory.items()) + ".")
    summary = "\n".join(lines) + "\n"
    print("\n" + summary)

    os.makedirs(args.out, exist_ok=True)
    result = {
        "config": {k: v for k, v in vars(args).items()},
        "device": harness.describe_device(device), "torch": torch.__version__, "batch": batch,
        "identical": first_divergence is None, "first_divergence": first_divergence, "max_rel_loss_diff": max_rel,
        "steps_with_ties": tie_steps,
        "retrieval": {"before": before, "after": after},
        "speedup": rows, "loss_peak_bytes": memory,
        "runs": {r.name: {"loss": r.losses, "loss_time_s": r.loss_times, "step_time_s": r.step_times} for r in runs},
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_curves(runs, os.path.join(args.out, "curves.png"),
                f"{args.data}{', multi-label' if args.multi_label else ''}, batch {batch}"
                f"{f', bank {args.bank_size}' if args.bank_size else ''}, "
                f"{harness.describe_device(device)}")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    if args.readme:
        section = os.path.basename(os.path.normpath(args.out))
        png = os.path.relpath(os.path.join(args.out, "curves.png"), os.path.dirname(os.path.abspath(args.readme)))
        harness.replace_section(args.readme, f"train:{section}", summary + f"\n![loss curves and step times]({png})\n")
    print(f"wrote results.json, summary.md and curves.png to {args.out}")
    if shard:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
