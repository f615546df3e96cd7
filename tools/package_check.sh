#!/usr/bin/env bash
# `make package-check`: tripletops as a user gets it. From this checkout: an sdist; from
# the sdist, a wheel (built in a fresh virtual environment against its torch); the wheel
# installed into that environment; a smoke test run from outside the source tree. Also:
# an isolated `pip install` of the sdist must stop within seconds and point to
# --no-build-isolation, instead of downloading another torch.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "package-check: sdist from the checkout"
"$PYTHON" -m pip install -q build
"$PYTHON" -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT" >"$WORK/sdist.log" 2>&1 \
  || { cat "$WORK/sdist.log"; exit 1; }
SDIST="$(ls "$WORK"/dist/tripletops-*.tar.gz)"
tar -tzf "$SDIST" >"$WORK/sdist.txt"
for f in csrc/common.h csrc/cpu/rows_cpu.h csrc/cuda/device.h csrc/cuda/batch_hard_cuda.cu setup_support.py LICENSE; do
  grep -q "/$f\$" "$WORK/sdist.txt" || { echo "package-check: the sdist lacks $f"; exit 1; }
done

echo "package-check: a fresh environment with $TORCH_SPEC"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "$TORCH_SPEC" "setuptools>=77" wheel ninja numpy

echo "package-check: an isolated build must stop at once"
start=$(date +%s)
if "$VPY" -m pip install --no-deps "$SDIST" >"$WORK/isolated.log" 2>&1; then
  echo "package-check: an isolated build succeeded; it must refuse"; exit 1
fi
elapsed=$(( $(date +%s) - start ))
grep -q -- "--no-build-isolation" "$WORK/isolated.log" || { cat "$WORK/isolated.log"; exit 1; }
echo "package-check: refused in ${elapsed} s with the --no-build-isolation instruction"
[ "$elapsed" -lt 120 ] || { echo "package-check: took too long"; exit 1; }

echo "package-check: wheel from the sdist, installed"
MAX_JOBS="${MAX_JOBS:-2}" "$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheels" "$SDIST"
"$VPY" -m pip install -q --no-deps "$WORK"/wheels/tripletops-*.whl
cd "$WORK"  # outside the source tree: the installed package, not the checkout
TRIPLETOPS_STRICT=1 "$VPY" - <<'PY'
import torch, tripletops
info = tripletops.extension_available()
assert info and "cpu" in info.devices, info
assert "site-packages" in tripletops.__file__, tripletops.__file__
x = torch.randn(32, 16, requires_grad=True)
y = torch.arange(8).repeat_interleave(4)
loss = tripletops.batch_hard_loss(x, y, margin=0.2)
loss.backward()
ref = tripletops.reference.batch_hard_loss(x.detach().double(), y, margin=0.2)
assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), (loss, ref)
assert torch.isfinite(x.grad).all()
import importlib, sys
for name in ("tripletops.integrations.sentence_transformers", "tripletops.integrations.pml"):
    importlib.import_module(name)  # shipped; imports its library only when a class is used
assert "sentence_transformers" not in sys.modules and "pytorch_metric_learning" not in sys.modules
print(f"package-check: wheel works outside the tree (torch {torch.__version__}, {info})")
PY
