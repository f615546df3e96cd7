"""One call of a target row, for `ncu` (tools/gpu_check.py's ncu stage): ncu profiles the
kernel it names in this process. Cases: "bank" (batch-hard, B = 1024 against a 2^20 x 128
fp32 bank, forward + backward), "b8192" (batch-hard fp32, B = 8192, D = 512, forward +
backward) and "ball8192" (batch-all, the same rows). A warm-up call first, so that the profiled launch is not the first."""
import sys

import torch

import tripletops


def main() -> int:
    case = sys.argv[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    if case == "bank":
        x = torch.randn(1024, 128, device="cuda", generator=g, requires_grad=True)
        y = torch.arange(1024, device="cuda") // 8
        bank = torch.randn(1 << 20, 128, device="cuda", generator=g)
        bank_y = torch.randint(0, 128, (1 << 20,), device="cuda", generator=g)
        call = lambda: tripletops.batch_hard_loss(x, y, ref_embeddings=bank, ref_labels=bank_y)  # noqa: E731
    elif case == "ball8192":  # batch-all's hinge: batch_all_stream_kernel, forward and backward
        x = torch.randn(8192, 512, device="cuda", generator=g, requires_grad=True)
        y = torch.arange(8192, device="cuda") // 8
        call = lambda: tripletops.batch_all_loss(x, y)  # noqa: E731
    elif case == "b8192":
        x = torch.randn(8192, 512, device="cuda", generator=g, requires_grad=True)
        y = torch.arange(8192, device="cuda") // 8
        call = lambda: tripletops.batch_hard_loss(x, y)  # noqa: E731
    else:
        raise SystemExit(f"ncu_driver: unknown case {case!r}")
    for _ in range(2):
        call().backward()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
