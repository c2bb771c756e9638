"""sha256 of files, cached while a file's stat stays the same: how the registry verifies its entries cheaply.

Example:
    >>> cache = DigestCache()
    >>> cache.sha256(Path("metadata.json")) == sha256(Path("metadata.json"))  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# A file changed less than this long ago is hashed again on every read: a rewrite within the file system's
# timestamp granularity can leave size, mtime and ctime as they were (git's "racily clean" index entries).
RACY_NS = 2_000_000_000


class DigestCache:
    """sha256 of files, reused while a file's (device, inode, size, mtime, ctime) stay the same, so listing the
    registry reads no unchanged file twice. ``ctime`` is set by the kernel on every write or ``touch``, so a file
    altered and given its old mtime back is still hashed again. Thread-safe."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple[int, ...], str]] = {}
        self._lock = threading.Lock()

    def sha256(self, path: Path) -> str:
        """Hex sha256 of ``path``: the one computed before if its stat is unchanged (and was settled then)."""
        st = path.stat()
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            hit = self._known.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        digest = sha256(path)
        settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS
        if settled and path.stat().st_ctime_ns == st.st_ctime_ns:  # and not written while it was read
            with self._lock:
                self._known[path] = (stamp, digest)
        return digest
