"""Exit 0 when this checkout's extension is installed (editable) in this Python, built
against the torch that runs, and newer than every source it is built from; else 1.
`make install` rebuilds only then (a full build takes ~30 s on 2 cores)."""
from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    try:
        import pytest  # noqa: F401  (the test extras were installed with the build)
        import tripletops
    except ImportError:
        return 1
    package = os.path.dirname(os.path.abspath(tripletops.__file__))
    if package != os.path.join(ROOT, "tripletops") or not tripletops.extension_available():
        return 1
    built = glob.glob(os.path.join(package, "_C*.so"))
    sources = [os.path.join(ROOT, f) for f in ("setup.py", "setup_support.py", "pyproject.toml")]
    sources += glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True)
    if not built or min(os.path.getmtime(b) for b in built) < max(os.path.getmtime(s) for s in sources):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
