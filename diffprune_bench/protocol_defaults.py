"""The digits dataset's protocol defaults, in a module without heavy imports.

They are the suite's protocol (benchmarks/digits.yaml relies on them), ``diffprune_bench.data`` registers
the dataset with them, and ``diffbench run --help`` shows them beside every option a dataset sets: kept
here, apart from torch, so the help is quick and can never show other values than the runs use.
"""

from __future__ import annotations

from typing import Any

#: the protocol of the committed digits table (benchmarks/digits.yaml adds only its grid): a plain
#: `diffbench run` trains the table's base and its FID is the table's cell for that seed
DIGITS_DEFAULTS: dict[str, Any] = {
    "preset": "tiny",
    "base_steps": 2025,
    "finetune_steps": 200,
    "scratch_steps": 600,
    "batch_size": 64,
    "lr": 2e-3,
    "ema_decay": 0.995,
    "sample_steps": 50,
    "num_samples": 1000,
    "fid_extractor": "digits-net",
    "threads": 1,
}
