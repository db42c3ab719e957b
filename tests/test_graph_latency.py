"""Latency is measured once per distinct executed graph: what the signature sees, and the reuse itself."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffprune_bench.code_digest import code_digest
from diffprune_bench.harness import run
from diffprune_bench.metrics.graph_latency import (
    LatencyStore,
    measurement_key,
    module_signature,
    trajectory_signature,
)
from diffprune_bench.metrics.latency import MachineLock, measure_ab
from diffprune_bench.models import build_model


class Scaled(nn.Module):
    """A module whose work depends on a plain attribute (like a slimmable width view or a cache branch)."""

    def __init__(self, inner: nn.Module, width: float) -> None:
        super().__init__()
        self.inner, self.width = inner, width


def every_step(module: nn.Module):
    return lambda _step: module


def test_weights_do_not_change_the_signature_but_the_graph_does():
    model = build_model("tiny", seed=0)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in masked.parameters():
            parameter.mul_((torch.rand_like(parameter) > 0.5).float())  # unstructured zeros: the dense graph
    assert trajectory_signature(every_step(model), 50) == trajectory_signature(every_step(masked), 50)
    assert trajectory_signature(every_step(model), 50) != trajectory_signature(every_step(model), 25)
    other_seed = build_model("tiny", seed=1)
    assert module_signature(model) == module_signature(other_seed)
    narrower = nn.Conv2d(3, 4, 3)
    assert module_signature(nn.Conv2d(3, 8, 3)) != module_signature(narrower)  # pruned channels
    assert module_signature(nn.Conv2d(3, 8, 3, stride=2)) != module_signature(nn.Conv2d(3, 8, 3))
    reregistered = nn.Linear(4, 4)  # what removing a parametrization leaves: weight registered after bias
    weight = reregistered.weight
    del reregistered.weight
    reregistered.weight = weight
    assert [n for n, _ in reregistered.named_parameters()] == ["bias", "weight"]
    assert module_signature(reregistered) == module_signature(nn.Linear(4, 4))
    strided = nn.Linear(4, 4)
    strided.weight = nn.Parameter(torch.randn(4, 4).t())  # a copy on every call
    assert module_signature(strided) != module_signature(nn.Linear(4, 4))
    inner = nn.Linear(4, 4)
    assert module_signature(Scaled(inner, 0.5)) != module_signature(Scaled(inner, 0.75))
    hooked = nn.Linear(4, 4)
    hooked.register_forward_pre_hook(lambda _m, args: args)
    assert module_signature(hooked) != module_signature(nn.Linear(4, 4))
    # which step runs which module is part of the trajectory (DeepCache's full / shallow steps)
    a, b = nn.Linear(4, 4), nn.Linear(4, 5)
    assert (trajectory_signature(lambda i: a if i % 2 else b, 4)
            != trajectory_signature(lambda i: a if i % 3 else b, 4))


def test_a_graph_timed_once_is_not_timed_again(tmp_path):
    calls = []
    store = LatencyStore(tmp_path)
    key = measurement_key("trajectory", "dense", {"batch": 4})

    def dense():
        calls.append("dense")

    def method():
        calls.append("method")

    lock = MachineLock(tmp_path)
    with lock.computing():
        first = measure_ab(dense, method, torch.device("cpu"), repeats=10, lock=lock, store=store, key=key,
                           origin="run-a")
        assert len(calls) == 22 and first["reused"] is False and first["measured_in"] == "run-a"
        calls.clear()
        second = measure_ab(dense, method, torch.device("cpu"), repeats=10, lock=lock, store=store, key=key,
                            origin="run-b")
    assert calls == [] and second["reused"] is True and second["measured_in"] == "run-a"
    assert second["speedup"] == first["speedup"] and second["times_s"] == first["times_s"]
    other = measure_ab(None, method, torch.device("cpu"), repeats=10, store=store,
                       key=measurement_key("trajectory", None, {"batch": 4}), origin="run-c")
    assert len(calls) == 11 and other["measured_in"] == "run-c"  # the baseline's own timing is another key
    lock.close()


def test_runs_of_one_architecture_share_a_measurement_and_others_do_not(tiny_config):
    first = run(tiny_config(method="magnitude", sparsity=0.5))[0]["metrics"]["latency"]
    same = run(tiny_config(method="random", sparsity=0.5))[0]["metrics"]["latency"]
    assert same["reused"] is True  # (first may itself reuse an earlier test's measurement of this graph)
    assert same["measured_in"] == first["measured_in"] and same["speedup"] == pytest.approx(first["speedup"])
    masked = run(tiny_config(method="magran", sparsity=0.5))[0]["metrics"]["latency"]
    nm = run(tiny_config(method="sparsedm", sparsity=0.5))[0]["metrics"]["latency"]
    assert nm["reused"] is True and nm["measured_in"] == masked["measured_in"]  # N:M: the dense graph too
    dense_ft = run(tiny_config(method="dense-ft"))[0]["metrics"]["latency"]
    assert masked["graph_key"] != first["graph_key"]  # the dense graph, not the pruned one
    assert dense_ft["reused"] is True and dense_ft["measured_in"] == masked["measured_in"]


def test_a_new_commit_that_leaves_the_package_alone_keeps_the_measurement(tiny_config, monkeypatch):
    """Slices are committed between runs: a commit of records, tests or docs must not empty the cache."""
    import diffprune_bench.harness as harness_module

    monkeypatch.setattr(harness_module, "git_commit", lambda: "commit-before")
    first = run(tiny_config(method="magnitude", sparsity=0.5))[0]
    monkeypatch.setattr(harness_module, "git_commit", lambda: "commit-after")
    later = run(tiny_config(method="random", sparsity=0.5))[0]
    assert (first["git_commit"], later["git_commit"]) == ("commit-before", "commit-after")
    assert later["code_digest"] == first["code_digest"] == code_digest()
    assert later["metrics"]["latency"]["reused"] is True
    assert later["metrics"]["latency"]["measured_in"] == first["metrics"]["latency"]["measured_in"]
