"""Where one cell's seconds go: a per-phase breakdown of ``diffbench run`` for a method and sparsity.

Phases: process start and imports (a fresh interpreter importing what a cell's worker imports), data,
dense base, FID extractor, reference statistics, floor FID, the method's prepare/training/export,
sampling the evaluation samples, FID/KID, MAC counting, SSIM (its dense reference samples apart),
latency, parameter counts and the weights hash, model export, writing the record and arrays.

Each phase is timed by wrapping the function that does it; time is charged to the innermost phase, and
phases that run others as part of their own job (training, latency, the dense SSIM samples, reference
statistics) keep everything inside them. Both wall time and process CPU time (``time.process_time``:
user + system of this process) are printed: on a shared, busy machine the CPU time is the steadier one.
"Overhead" is everything but training and sampling the evaluation samples.

Run it twice with the same ``--cache-dir`` to see a warm cache (the first call trains and caches the
dense base)::

    python benchmarks/bench_cell_profile.py --method dense --cache-dir /tmp/cell-cache
    python benchmarks/bench_cell_profile.py --method magnitude --sparsity 0.5 --cache-dir /tmp/cell-cache
    python benchmarks/bench_cell_profile.py --method steps --sparsity 0.5 --cache-dir /tmp/cell-cache
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

IMPORTS = "import diffprune_bench.cli, diffprune_bench.harness"
#: phases that are neither training nor sampling the evaluation samples
NOT_OVERHEAD = {"training", "sampling"}


class PhaseClock:
    """Wall and CPU seconds per phase; nested phases are charged to the innermost unless the outer absorbs."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [phase, absorbs, child wall, child cpu]

    def wrap(self, owner: Any, attribute: str, phase: str, absorbs: bool = False) -> None:
        """Replace ``owner.attribute`` by a timed version charged to ``phase`` (a name the code no longer has
        is said in one line, and its time stays in the phase around it)."""
        if not hasattr(owner, attribute):
            print(f"note: {getattr(owner, '__name__', owner)}.{attribute} not found; not timed apart", file=sys.stderr)
            return
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._stack and self._stack[-1][1]:  # inside a phase that keeps its nested work
                return original(*args, **kwargs)
            self._stack.append([phase, absorbs, 0.0, 0.0])
            wall0, cpu0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                _, _, child_wall, child_cpu = self._stack.pop()
                self.wall[phase] += wall - child_wall
                self.cpu[phase] += cpu - child_cpu
                self.calls[phase] += 1
                if self._stack:
                    self._stack[-1][2] += wall
                    self._stack[-1][3] += cpu

        setattr(owner, attribute, timed)


def time_imports() -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh interpreter that imports what a cell's process imports."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def instrument(clock: PhaseClock) -> Callable[..., Any]:
    """Wrap the pipeline's functions; returns the (wrapped) ``harness.run``."""
    from diffprune_bench import evaluator, harness
    from diffprune_bench.metrics import fid

    wrap = clock.wrap
    wrap(harness, "load_dataset", "data")
    wrap(harness, "get_base_model", "base (load or train)", absorbs=True)
    wrap(evaluator, "build_extractor", "FID extractor load")
    wrap(evaluator, "reference_stats", "reference statistics", absorbs=True)
    wrap(evaluator.Evaluator, "__init__", "floor FID + evaluator setup")
    wrap(evaluator.Evaluator, "sample", "sampling")
    wrap(evaluator.Evaluator, "dense_samples", "SSIM dense samples", absorbs=True)
    wrap(evaluator.Evaluator, "latency", "latency", absorbs=True)
    wrap(evaluator.Evaluator, "evaluate", "evaluate (rest)")
    wrap(evaluator.Evaluator, "save_reference_features", "writing")
    from diffprune_bench.metrics import fashion_net, spaces

    for extractor in (fid.ShippedDigitsExtractor, fid.InceptionExtractor, fashion_net.ShippedFashionExtractor):
        wrap(extractor, "features", "FID/KID")  # every space's features (primary and further extractors)
    wrap(spaces.FeatureSpace, "score", "FID/KID")
    wrap(evaluator, "trajectory_macs", "MACs")
    for owner, attribute in ((evaluator, "count_macs"), (getattr(evaluator, "MacCache", None), "count")):
        if owner is not None and hasattr(owner, attribute):  # older code counts without a cache
            wrap(owner, attribute, "MACs")
    wrap(evaluator, "mean_ssim", "SSIM")
    wrap(evaluator, "count_params", "params + weights hash")
    wrap(evaluator, "weights_hash", "params + weights hash")
    wrap(evaluator, "save_image", "writing")
    wrap(evaluator, "save_samples_uint8", "writing")
    wrap(harness, "_train", "training", absorbs=True)
    wrap(harness, "_save_model", "model export")
    wrap(harness, "write_record", "writing")
    wrap(harness, "write_config", "writing")
    original_create = harness.create_method

    def create_method(*args: Any, **kwargs: Any) -> Any:
        method = original_create(*args, **kwargs)
        wrap(method, "export", "method export")
        return method

    harness.create_method = create_method
    wrap(harness, "run", "run (rest)")
    return harness.run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dense")
    parser.add_argument("--sparsity", type=float, default=0.0)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", required=True, help="reuse it between calls: the base is cached there")
    parser.add_argument("--results-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # as in a sweep's workers

    import_wall, import_cpu = time_imports()
    from diffprune_bench.config import make_config

    clock = PhaseClock()
    run = instrument(clock)
    with tempfile.TemporaryDirectory() as scratch:
        cfg = make_config({"method": args.method, "sparsity": args.sparsity, "dataset": args.dataset,
                           "seed": args.seed, "cache_dir": args.cache_dir,
                           "results_dir": args.results_dir or scratch})
        wall0, cpu0 = time.perf_counter(), time.process_time()
        records = run(cfg)
        total_wall, total_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    clock.wall["process start + imports"], clock.cpu["process start + imports"] = import_wall, import_cpu
    clock.calls["process start + imports"] = 1
    total_wall += import_wall
    total_cpu += import_cpu

    metrics = records[0]["metrics"]
    print(f"cell {args.method} s={args.sparsity:g} on {args.dataset} seed {args.seed}: "
          f"FID {metrics['fid']!r}, latency {'reused' if metrics['latency'].get('reused') else 'measured'}")
    print(f"{'phase':<30}{'calls':>6}{'wall s':>10}{'wall %':>8}{'cpu s':>10}{'cpu %':>8}")
    for phase in sorted(clock.wall, key=lambda p: -clock.cpu[p]):
        print(f"{phase:<30}{clock.calls[phase]:>6}{clock.wall[phase]:>10.2f}"
              f"{100 * clock.wall[phase] / total_wall:>8.1f}{clock.cpu[phase]:>10.2f}"
              f"{100 * clock.cpu[phase] / total_cpu:>8.1f}")
    print(f"{'total':<30}{'':>6}{total_wall:>10.2f}{100.0:>8.1f}{total_cpu:>10.2f}{100.0:>8.1f}")
    over_wall = sum(v for p, v in clock.wall.items() if p not in NOT_OVERHEAD)
    over_cpu = sum(v for p, v in clock.cpu.items() if p not in NOT_OVERHEAD)
    print(f"overhead (neither training nor sampling): wall {over_wall:.2f} s = {100 * over_wall / total_wall:.1f} %, "
          f"cpu {over_cpu:.2f} s = {100 * over_cpu / total_cpu:.1f} %")


if __name__ == "__main__":
    main()
