"""Whether Debian's Fashion-MNIST files are installed here: tests that read them skip, saying how to get
them, where they are not (CI installs the package)."""

from __future__ import annotations

import pytest

from diffprune_bench import fashion_mnist

INSTALLED, NOT_INSTALLED_WHY = fashion_mnist.package_files()
needs_package = pytest.mark.skipif(
    not INSTALLED,
    reason=f"Fashion-MNIST files unavailable ({NOT_INSTALLED_WHY}): apt-get install dataset-fashion-mnist",
)
