"""Shipped bases: a base written beside the code loads by its bare name, is hashed in every record, and a
dataset can default to it while ``--base train`` still trains one."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from typer.testing import CliRunner

from diffprune_bench import shipped_bases
from diffprune_bench.cli import app
from diffprune_bench.config import make_config
from diffprune_bench.errors import BenchError
from diffprune_bench.harness import resolve_config, run
from diffprune_bench.models import build_model, check_local_base, load_pretrained_with_info, weights_hash
from diffprune_bench.shipped_bases import TRAIN_KEYWORD, pretrained_base, write_shipped_base

RECIPE = {"name": "toy", "config": {"dataset": "digits", "preset": "tiny", "seed": 7}, "weights_hash": None,
          "train": {"optimizer_steps": 100, "images_seen": 6400}}


@pytest.fixture
def toy_base(tmp_path, monkeypatch):
    """A tiny-preset base shipped as ``toy`` in a bases folder of this test's own."""
    monkeypatch.setattr(shipped_bases, "BASES_DIR", tmp_path / "bases")
    model = build_model("tiny", seed=7)
    folder = write_shipped_base(model, "toy", {**RECIPE, "weights_hash": weights_hash(model)}, tmp_path / "bases")
    return model, folder


def test_a_shipped_base_loads_by_name_with_its_recipe(toy_base):
    model, folder = toy_base
    assert shipped_bases.shipped_base_names() == ["toy"]
    loaded, info = load_pretrained_with_info("toy", "tiny")
    assert weights_hash(loaded) == weights_hash(model)
    theirs, ours = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert info["location"] == "shipped with diffprune_bench"  # no machine path in a record
    assert info["recipe"]["weights_hash"] == weights_hash(model)
    assert not any(folder.parent.glob(".toy.tmp"))  # written whole, then renamed


def test_shipped_files_honour_the_umask(toy_base):
    _, folder = toy_base
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes["diffusion_pytorch_model.safetensors"] & stat.S_IRGRP  # safetensors alone writes 0600
    assert json.loads((folder / "recipe.json").read_text())["name"] == "toy"


def test_a_run_on_a_shipped_base_records_its_name_and_hash(toy_base, tiny_config):
    model, _ = toy_base
    record = run(tiny_config(method="dense", base="toy"))[0]
    assert record["status"] == "ok"
    assert record["base"]["source"] == "toy" and record["base"]["hash"] == weights_hash(model)
    assert record["base"]["train"] == RECIPE["train"]  # the recipe's training counts in the row's compute
    assert record["config"]["base"] == "toy"


def test_an_unknown_bare_name_names_the_shipped_bases(toy_base):
    check_local_base("toy")  # a shipped name is no local path and passes the pre-check
    with pytest.raises(BenchError, match="shipped base: toy"):
        load_pretrained_with_info("not-a-base", "tiny")


def test_a_local_folder_of_the_same_name_is_given_with_a_path(toy_base, tmp_path, monkeypatch):
    other = build_model("tiny", seed=8)
    other.save_pretrained(tmp_path / "work" / "toy")
    monkeypatch.chdir(tmp_path / "work")
    assert weights_hash(load_pretrained_with_info("./toy", "tiny")[0]) == weights_hash(other)
    assert weights_hash(load_pretrained_with_info("toy", "tiny")[0]) == weights_hash(toy_base[0])


def test_fashion_defaults_to_its_shipped_base_and_train_overrides_it():
    assert "fashion-mnist" in shipped_bases.shipped_base_names()
    shipped = resolve_config(make_config({"dataset": "fashion-mnist"}))
    assert shipped.base == "fashion-mnist" and pretrained_base(shipped) == "fashion-mnist"
    trained = resolve_config(make_config({"dataset": "fashion-mnist", "base": TRAIN_KEYWORD}).validate())
    assert trained.base == TRAIN_KEYWORD and pretrained_base(trained) is None  # stays "train" when re-resolved
    assert pretrained_base(resolve_config(trained)) is None
    digits = resolve_config(make_config({"dataset": "digits"}))
    assert pretrained_base(digits) is None


def test_the_shipped_fashion_base_matches_its_recipe_and_preset():
    model, info = load_pretrained_with_info("fashion-mnist", "fashion")
    recipe = info["recipe"]
    assert weights_hash(model) == recipe["weights_hash"]
    assert recipe["config"]["preset"] == "fashion" and recipe["config"]["threads"] == 1
    assert recipe["retrain"].startswith("diffbench run --method dense --dataset fashion-mnist --base train")


def test_a_shipped_base_names_no_folder_it_came_from(tmp_path):
    """A base shipped from a snapshot folder must not publish that folder (diffusers' ``_name_or_path``)."""
    build_model("tiny", seed=7).save_pretrained(tmp_path / "snapshots" / "toy-steps100")
    snapshot, _ = load_pretrained_with_info(str(tmp_path / "snapshots" / "toy-steps100"), "tiny")
    folder = write_shipped_base(snapshot, "toy", RECIPE, tmp_path / "bases")
    assert "snapshots" not in (folder / "config.json").read_text()
    shipped = json.loads((shipped_bases.BASES_DIR / "fashion-mnist" / "config.json").read_text())
    assert "_name_or_path" not in shipped and shipped["sample_size"] == 28


def test_cli_help_names_the_train_keyword():
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "`train` trains one" in result.output
