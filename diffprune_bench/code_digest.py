"""What version of the code trained or timed something: a digest of the package's own source.

Caches of work that depends on the code (latency per graph, models shared between the cells of a suite)
used to be keyed by the git commit. Every commit then emptied them, including the commits that only add
a slice's records, a test or a README line: the workflow commits each slice, so a suite's next slice
measured every latency and retrained every shared model again. The digest changes exactly when a source
file of the package (or the torch / diffusers it runs on) changes, committed or not, which is also what
a cached value has to follow: an uncommitted edit to a method was invisible to the commit key.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import diffusers
import torch

PACKAGE = Path(__file__).resolve().parent


@functools.cache
def code_digest() -> str:
    """sha256 prefix over the package's .py files (path and bytes) and the torch and diffusers versions."""
    digest = hashlib.sha256(f"torch {torch.__version__} diffusers {diffusers.__version__}\n".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
