"""One rank that calls tripletops.distributed many times, then exits at once (not collected
by pytest).

    python dist_exit_worker.py RANK WORLD INIT_FILE CASE

CASE is "loss" (batch-hard losses) or one of dist_cases.ERROR_CASES (every rank raises the
same ValueError, caught here). After each call returns or raises, the rank checks, before
anything can give up the GIL, that gloo's worker thread holds none of the tensors the call
handed to a collective: their use counts are 1 and no C++ reference keeps their Python
objects alive. It prints how many calls left some held. Then it ends without
destroy_process_group, as a script that raised often does: the exit must be clean (code 0),
never a SIGABRT from a worker thread that still needed the GIL for such a tensor.
"""
import os
import sys
import weakref

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_cases import ERROR_CASES  # noqa: E402

from tripletops import distributed as tdist  # noqa: E402

CALLS = 40
handed = []  # weak references to every tensor handed to a collective since the last check


def recording(collective):
    def wrapper(*args, **kwargs):
        for arg in args[:2]:
            for t in arg if isinstance(arg, list) else [arg]:
                if isinstance(t, torch.Tensor):
                    handed.append(weakref.ref(t))
        return collective(*args, **kwargs)
    return wrapper


def held() -> bool:
    """Whether a tensor of the last call is still held from C++ (gloo's worker thread). A
    tensor that no one holds any more is gone; one that lives is referenced here only by
    `t` and getrefcount's argument, unless a C++ reference keeps its Python object."""
    still = False
    for ref in handed:
        t = ref()
        if t is not None and (t._use_count() > 1 or sys.getrefcount(t) > 2):
            still = True
        del t
    handed.clear()
    return still


def main() -> None:
    rank, world, init_file, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    # The main thread keeps the GIL between the call's return and the exit, so a worker
    # thread that still needs it then finds the interpreter finalizing: the race, made likely.
    sys.setswitchinterval(10.0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dist.all_gather = recording(dist.all_gather)
    dist.all_reduce = recording(dist.all_reduce)
    calls_held = 0
    for call in range(CALLS):
        if case == "loss":
            x = torch.randn(4 + rank, 3, requires_grad=True)
            loss = tdist.batch_hard_loss(x, torch.arange(4 + rank) % 2)
            calls_held += held()
            if call == CALLS - 1:  # the last call: its backward's all-reduce just before the exit
                loss.backward()
                print(f"rank {rank}: loss and backward done")
            continue
        x, y = ERROR_CASES[case](rank)
        try:
            tdist.batch_hard_loss(x, y)
        except ValueError as exc:
            message = str(exc)
        calls_held += held()
        if call == CALLS - 1:
            print(f"rank {rank}: raised {message}")
    print(f"rank {rank}: calls that left a tensor held: {calls_held} of {CALLS}")


if __name__ == "__main__":
    main()
