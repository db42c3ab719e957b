"""Cells that train the same model share one training: the sweep marks them, the harness reuses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_suite_compositions import suite_data

from diffprune_bench import trainer as trainer_mod
from diffprune_bench.config import make_config
from diffprune_bench.harness import resolve_config, run
from diffprune_bench.sweep.suite import parse_suite, share_repeated_training
from diffprune_bench.trained_cache import entry_path, training_key


def test_the_key_ignores_what_happens_after_training_and_follows_what_trains():
    base = make_config({"method": "magnitude", "sparsity": 0.5, "finetune_steps": 8})
    same = [base.replace(then="steps", then_params={"saving": 0.5}), base.replace(results_dir="elsewhere"),
            base.replace(run_id="x", suite="other", latency_repeats=20, share_training=True)]
    assert all(training_key(cfg) == training_key(base) for cfg in same)
    different = [base.replace(sparsity=0.25), base.replace(seed=1), base.replace(finetune_steps=9),
                 base.replace(method_params={"p": 1}), base.replace(method="taylor")]
    assert len({training_key(cfg) for cfg in different} | {training_key(base)}) == len(different) + 1
    assert training_key(base, "commit-a") != training_key(base, "commit-b")  # new code, new training


def test_a_sweep_shares_only_repeated_trainings_and_runs_the_repeats_last():
    suite = parse_suite(suite_data(compositions=[
        {"method": "magnitude", "then": "steps", "then_params": {"saving": 0.5}},
        {"method": "magnitude", "then": "deepcache", "then_params": {"interval": 2}},
        {"method": "magnitude", "then": "steps", "sparsities": [0.25], "then_params": {"saving": 0.5}},
    ]))
    ordered = share_repeated_training([(cell, suite.cell_config(cell)) for cell in suite.cells()])
    assert sorted(c.label() for c, _ in ordered) == sorted(c.label() for c in suite.cells())
    shared = [(c.method, c.then, c.sparsity) for c, cfg in ordered if cfg.share_training]
    # magnitude at 0.5 is trained by its plain cell and its two compositions; nothing else repeats
    assert sorted(shared, key=str) == sorted([("magnitude", None, 0.5), ("magnitude", "steps", 0.5),
                                              ("magnitude", "deepcache", 0.5)], key=str)
    assert [(c.then, c.sparsity) for c, _ in ordered[-2:]] == [("steps", 0.5), ("deepcache", 0.5)]
    assert ordered[0][0].method == "dense"


def test_a_composed_run_evaluates_the_shared_training_instead_of_training_again(tiny_config, monkeypatch):
    plain = tiny_config(method="magnitude", sparsity=0.5, share_training=True)
    first = run(plain)[0]
    assert "reused_from" not in first["training"]
    assert entry_path(resolve_config(plain.validate()), first["code_digest"]).is_file()

    def no_training(*_args, **_kwargs):
        raise AssertionError("a shared training was run again")

    composed = plain.replace(then="steps", then_params={"saving": 0.5}, run_id="composed-shared")
    monkeypatch.setattr(trainer_mod.Trainer, "train", no_training)
    reused = run(composed)[0]
    monkeypatch.undo()
    assert reused["training"]["reused_from"] == first["run_id"]
    assert {k: v for k, v in reused["training"].items() if k != "reused_from"} == first["training"]
    # the same samples as the composition trained by itself (training is deterministic on CPU)
    alone = run(composed.replace(share_training=False, run_id="composed-alone"))[0]
    assert "reused_from" not in alone["training"]
    assert reused["metrics"]["fid"] == pytest.approx(alone["metrics"]["fid"], abs=1e-9)
    features = [np.load(Path(r["paths"]["features"])) for r in (reused, alone)]
    np.testing.assert_array_equal(*features)
    saved = json.loads((Path(reused["paths"]["run_dir"]) / "record.json").read_text())
    assert saved["training"]["reused_from"] == first["run_id"]


def test_a_damaged_entry_is_retrained_not_fatal(tiny_config):
    cfg = tiny_config(method="random", sparsity=0.5, share_training=True)
    first = run(cfg)[0]
    path = entry_path(resolve_config(cfg.validate()), first["code_digest"])
    path.write_bytes(b"not a torch file")
    again = run(cfg.replace(run_id="after-damage"))[0]
    assert "reused_from" not in again["training"] and again["status"] == "ok"
