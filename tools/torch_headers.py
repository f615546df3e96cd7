"""The C++/CUDA headers of a given torch release, without installing it: only the
`torch/include/` members of its Linux x86-64 wheel are read, from a local wheel when one
is given or found in pip's wheel folders, else from PyPI with HTTP range requests (tens
of MB out of a wheel of about a GB). Cached under ~/.cache/tripletops/torch-headers/.

    python tools/torch_headers.py 2.6.0        # prints the include folder

tools/cuda_check.py --torch VERSION compiles every source against them.
"""
from __future__ import annotations

import argparse
import glob
import html.parser
import io
import os
import re
import shutil
import sys
import urllib.request
import zipfile
from typing import Optional

CACHE = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "tripletops",
                     "torch-headers")
INDEX = "https://pypi.org/simple/torch/"
LOCAL_WHEEL_DIRS = ["/opt/wheels", "/opt/pypi-more/files", "/opt/pypi/files"]


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file through HTTP range requests, in 4 MiB
    blocks (the wheel's headers lie together, so a few dozen requests fetch them)."""

    BLOCK = 4 << 20

    def __init__(self, url: str):
        self.url, self.pos, self.blocks = url, 0, {}
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=60) as r:
            self.size = int(r.headers["Content-Length"])

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def _block(self, i: int) -> bytes:
        if i not in self.blocks:
            start, end = i * self.BLOCK, min(self.size, (i + 1) * self.BLOCK) - 1
            req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end}"})
            with urllib.request.urlopen(req, timeout=120) as r:
                data = r.read()
            if len(data) != end - start + 1:
                raise OSError(f"range request to {self.url} returned {len(data)} bytes, expected {end - start + 1}")
            self.blocks[i] = data
        return self.blocks[i]

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.size - self.pos
        out = bytearray()
        while n > 0 and self.pos < self.size:
            i, off = divmod(self.pos, self.BLOCK)
            chunk = self._block(i)[off:off + n]
            out += chunk
            self.pos += len(chunk)
            n -= len(chunk)
        return bytes(out)

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href"]


def wheel_url(version: str) -> str:
    with urllib.request.urlopen(INDEX, timeout=60) as r:
        parser = _Links()
        parser.feed(r.read().decode())
    pattern = re.compile(rf"/torch-{re.escape(version)}-cp3\d+-cp3\d+-manylinux[^/]*x86_64\.whl")
    matches = [link.split("#")[0] for link in parser.links if pattern.search(link.split("#")[0])]
    if not matches:
        raise SystemExit(f"torch_headers: no Linux x86-64 wheel of torch {version} on {INDEX}")
    return sorted(matches)[-1]


def local_wheel(version: str) -> Optional[str]:
    for folder in LOCAL_WHEEL_DIRS:
        found = sorted(glob.glob(os.path.join(folder, f"torch-{version}[-+]*x86_64.whl")))
        if found:
            return found[-1]
    return None


def headers(version: str, wheel: Optional[str] = None) -> str:
    """The include folder of torch `version` (fetched once, then cached)."""
    dest = os.path.join(CACHE, version)
    include = os.path.join(dest, "torch", "include")
    if os.path.exists(os.path.join(dest, ".complete")):
        return include
    shutil.rmtree(dest, ignore_errors=True)
    wheel = wheel or local_wheel(version)
    source = wheel or wheel_url(version)
    print(f"torch_headers: torch {version} headers from {source}", file=sys.stderr, flush=True)
    with zipfile.ZipFile(open(wheel, "rb") if wheel else io.BufferedReader(RangeFile(source), 1 << 20)) as z:
        members = [m for m in z.infolist() if m.filename.startswith("torch/include/") and not m.is_dir()]
        if not members:
            raise SystemExit(f"torch_headers: {source} has no torch/include/")
        members.sort(key=lambda m: m.header_offset)  # read in file order: consecutive range blocks
        tmp = dest + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        for m in members:
            z.extract(m, tmp)
    os.replace(tmp, dest)
    open(os.path.join(dest, ".complete"), "w").close()
    return include


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("version")
    ap.add_argument("--wheel", help="a local wheel file of that version")
    args = ap.parse_args()
    print(headers(args.version, args.wheel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
