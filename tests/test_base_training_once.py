"""A base is trained once: two processes that want the same uncached base do not both train it, and a
sweep trains the bases of all its seeds in its first phase even where a seed's dense cell is done."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from conftest import TINY_BUDGET

from diffprune_bench.config import make_config
from diffprune_bench.sweep.cells import Cell, baseline_first


def _want_base(cache_dir: str, out: str) -> None:
    """In a fresh process: get the digits base of seed 5 and note whether this process trained it."""
    import json

    import torch

    from diffprune_bench.base_model import get_base_model
    from diffprune_bench.data import load_dataset
    from diffprune_bench.harness import resolve_config

    cfg = resolve_config(make_config({**TINY_BUDGET, "seed": 5, "cache_dir": cache_dir}))
    base = get_base_model(cfg, load_dataset("digits"), torch.device("cpu"))
    Path(out).write_text(json.dumps({"trained": base.info["cached"] is False, "hash": base.info["hash"]}))


def test_two_processes_wanting_one_base_train_it_once(tmp_path):
    import json

    context = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    workers = [context.Process(target=_want_base, args=(str(tmp_path / "cache"), str(out))) for out in outs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=1200)  # a deadline for a hung lock, not a speed claim
        assert worker.exitcode == 0
    results = [json.loads(out.read_text()) for out in outs]
    assert sorted(r["trained"] for r in results) == [False, True]  # one trained it, the other loaded it
    assert results[0]["hash"] == results[1]["hash"]
    assert len(list((tmp_path / "cache" / "bases").glob("*/base.json"))) == 1


def _cell(method: str, seed: int, sparsity: float = 0.5, **options):
    cfg = make_config({"method": method, "seed": seed, "sparsity": 0.0 if method in ("dense", "dense-ft") else sparsity,
                       **options})
    return Cell("digits", method, cfg.sparsity, seed, then=cfg.then), cfg


def test_a_seed_without_its_dense_cell_trains_its_base_in_the_first_phase_through_a_short_cell():
    work = [_cell("dense", 0), _cell("magnitude", 0), _cell("ddsm", 1), _cell("steps", 1), _cell("magnitude", 1),
            _cell("magnitude", 2, then="steps", then_params={"saving": 0.5}), _cell("magnitude", 2, sparsity=0.75)]
    first, rest = baseline_first(work)
    assert [(cell.method, cell.seed) for cell, _ in first] == [("dense", 0), ("steps", 1), ("magnitude", 2)]
    assert first[2][1].sparsity == 0.75 and first[2][1].then is None  # never a composition (it reuses training)
    assert len(first) + len(rest) == len(work) and not {id(i) for i in first} & {id(i) for i in rest}


def test_a_seed_whose_dense_cell_is_pending_needs_no_stand_in():
    work = [_cell("magnitude", 0), _cell("steps", 0), _cell("dense", 0)]
    first, _ = baseline_first(work)
    assert [cell.method for cell, _ in first] == ["dense"]
