"""Run a computation at the caller's thread count and at another one (reproducibility tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def at_two_thread_counts(compute: Callable[[], T]) -> tuple[T, T]:
    """``compute()`` at the current intra-op thread count, then at another (restored afterwards)."""
    threads = torch.get_num_threads()
    first = compute()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        second = compute()
    finally:
        torch.set_num_threads(threads)
    return first, second
