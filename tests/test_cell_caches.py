"""A cell's caches (MAC traces, floor features, dense SSIM samples) change nothing: a cold and a warm cache
give the same features bit for bit and the same metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffprune_bench.harness import run
from diffprune_bench.metrics import mac_cache
from diffprune_bench.sample_cache import SampleCache

TIMING = ("latency", "speedup", "speedup_ci")  # measured once per graph: the warm run reuses the cold one's


def _cell(tiny_config, cache: Path, results: Path, method: str) -> dict:
    (record,) = run(tiny_config(method=method, sparsity=0.5, cache_dir=str(cache), results_dir=str(results)))
    return record


@pytest.mark.parametrize("method", ["magnitude", "steps"])
def test_a_warm_cache_gives_the_cold_cache_results(tiny_config, shared_cache, tmp_path, method):
    cache = tmp_path / "cache"
    if (shared_cache / "bases").is_dir():  # the session's tiny base: only the other caches start cold
        shutil.copytree(shared_cache / "bases", cache / "bases")
    cold = _cell(tiny_config, cache, tmp_path / "cold", method)
    assert list((cache / mac_cache.FOLDER).glob("*.json")), "the MAC traces were cached"
    assert list((cache / "dense-samples").glob("*.pt")), "the dense SSIM samples were cached"
    stats = sorted(p.name for p in (cache / "fid-stats").glob("*.npz"))
    assert len(stats) == 3, stats  # the reference, the floor's training images, the digits-mlp space's reference

    warm = _cell(tiny_config, cache, tmp_path / "warm", method)
    for name in ("features.npy",):
        assert Path(cold["paths"]["features"]).name == name
        assert Path(cold["paths"]["features"]).read_bytes() == Path(warm["paths"]["features"]).read_bytes()
    with np.load(cold["paths"]["samples_uint8"]) as a, np.load(warm["paths"]["samples_uint8"]) as b:
        assert np.array_equal(a["samples"], b["samples"])
    assert warm["metrics"]["latency"]["reused"] is True
    strip = lambda metrics: {k: v for k, v in metrics.items() if k not in TIMING}  # noqa: E731
    assert strip(warm["metrics"]) == strip(cold["metrics"])
    assert warm["protocol"] == cold["protocol"]  # the floor FID among them
    assert cold["metrics"]["ssim_to_dense"] < 1.0  # SSIM really compared with the dense samples


def test_a_corrupt_sample_entry_is_sampled_again(tmp_path):
    cache = SampleCache(tmp_path)
    fields = {"base": "abc", "steps": 4}
    made = cache.get_or_sample(fields, lambda: torch.arange(6.0).reshape(2, 3), torch.device("cpu"))
    assert cache.sampled == 1
    assert torch.equal(cache.get_or_sample(fields, lambda: torch.zeros(2, 3), torch.device("cpu")), made)
    assert cache.sampled == 1  # read back, not sampled
    (entry,) = (tmp_path / "dense-samples").glob("*.pt")
    entry.write_bytes(b"truncated")
    again = cache.get_or_sample(fields, lambda: torch.ones(2, 3), torch.device("cpu"))
    assert cache.sampled == 2 and torch.equal(again, torch.ones(2, 3))
    other = cache.get_or_sample({**fields, "steps": 5}, lambda: torch.full((2, 3), 7.0), torch.device("cpu"))
    assert torch.equal(other, torch.full((2, 3), 7.0)) and cache.sampled == 3  # other fields: another entry


def test_kid_on_one_blas_thread_is_clean_fids_kid_bit_for_bit():
    from cleanfid.fid import kernel_distance

    from diffprune_bench.metrics.fid import ReferenceStats, kid_from_features

    rng = np.random.default_rng(0)
    ours, theirs = np.tanh(rng.normal(size=(600, 64))), np.tanh(rng.normal(size=(540, 64)))
    np.random.seed(3)
    expected = float(kernel_distance(ours, theirs))  # clean-fid as is, on the default BLAS threads
    assert kid_from_features(ours, ReferenceStats.from_features(theirs), seed=3) == expected
