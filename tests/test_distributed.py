"""One run on several processes (CPU, gloo): shards, noise, DDP gradients, masks decided on rank 0.

The multi-process tests spawn real processes that join through the same environment variables a
launcher (torchrun, accelerate launch, submitit) sets, so they exercise ``distributed.py`` exactly as
a cluster run does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from diffprune_bench.distributed import Distributed, current
from diffprune_bench.errors import BenchError

RIGL_PARAMS = {"delta_t": 5}
STEPS = 20
BATCH = 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeRank(Distributed):
    """Rank ``rank`` of ``world_size`` without a process group: the data and noise logic only."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size


# ---------------------------------------------------------------- single process: nothing changes
def test_one_process_is_the_identity_and_the_default_everywhere():
    dist = current()
    assert type(dist) is Distributed and not dist.enabled and dist.is_main
    batch = torch.randn(6, 1, 8, 8)
    assert dist.local_shard(batch) is batch
    mask = torch.rand(4, 4) > 0.5
    assert dist.broadcast_(mask) is mask and dist.all_reduce_mean_(batch) is batch
    assert dist.mean(torch.tensor(0.25)) == 0.25 and dist.broadcast_object("run-id") == "run-id"
    with dist.sharded_step():
        assert not dist.sharding  # one process: the loss draws its noise exactly as before
    # the noise one process draws is diffusion_loss's draw: noise first, then timesteps
    x0 = torch.zeros(6, 1, 8, 8)
    noise, timesteps = dist.draw_noise(x0, 1000, torch.Generator().manual_seed(3))
    reference = torch.Generator().manual_seed(3)
    assert torch.equal(noise, torch.randn(x0.shape, generator=reference))
    assert torch.equal(timesteps, torch.randint(0, 1000, (6,), generator=reference))


def test_the_shards_of_two_ranks_are_the_global_batch_and_its_noise():
    x0 = torch.arange(8 * 64, dtype=torch.float32).reshape(8, 1, 8, 8)
    one = Distributed()
    whole_noise, whole_t = one.draw_noise(x0, 1000, torch.Generator().manual_seed(0))
    shards, noises, steps = [], [], []
    for rank in (0, 1):
        dist = FakeRank(rank, 2)
        local = dist.local_shard(x0)
        with dist.sharded_step():
            noise, t = dist.draw_noise(local, 1000, torch.Generator().manual_seed(0))
        shards.append(local)
        noises.append(noise)
        steps.append(t)
    assert torch.equal(torch.cat(shards), x0) and not torch.equal(shards[0], shards[1])
    assert torch.equal(torch.cat(noises), whole_noise) and torch.equal(torch.cat(steps), whole_t)
    # outside a training step (a method's prepare) every rank draws what one process draws
    outside, _ = FakeRank(1, 2).draw_noise(x0, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(outside, whole_noise)
    with pytest.raises(BenchError, match="batch size 6 is not divisible by the 4 processes"):
        FakeRank(0, 4).local_shard(torch.zeros(6, 1, 8, 8))


# ---------------------------------------------------------------- two real processes
def train_tiny(method_name: str, params: dict, steps: int) -> dict:
    """Train the tiny preset with ``method_name`` through the harness's context and trainer."""
    from diffprune_bench.base_model import make_context, seed_everything
    from diffprune_bench.config import make_config
    from diffprune_bench.data import load_dataset
    from diffprune_bench.models import build_model
    from diffprune_bench.registry import create_method
    from diffprune_bench.trainer import Trainer

    cfg = make_config({"method": method_name, "sparsity": 0.5, "batch_size": BATCH, "device": "cpu",
                       "num_workers": 0})
    device = current().setup(torch.device("cpu"))
    data = load_dataset("digits")
    seed_everything(0)
    model = build_model("tiny", seed=0).to(device)
    method = create_method(method_name, params)
    ctx = make_context(cfg, data, device, steps)
    model = method.prepare(model, ctx)
    stats = Trainer(model, method, ctx, lr=1e-3, ema_decay=0.0, grad_clip=1.0).train()
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "masks": {name: mask.clone() for name, mask in method.manager.masks().items()},
        "loss": stats.final_loss,
        "regrown": list(method.regrown_per_update),
    }


def rank_inputs(rank: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """Weights, grow scores and a mask that differ on every rank (as a non-deterministic kernel might)."""
    generator = torch.Generator().manual_seed(100 + rank)
    layer = nn.Linear(16, 16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 16, generator=generator))
    return layer, torch.rand(16, 16, generator=generator), torch.rand(16, 16, generator=generator) > 0.5


def mask_decisions() -> dict[str, torch.Tensor]:
    """MaskManager updates from rank-dependent inputs: what each rank ends up applying."""
    from diffprune_bench.toolkit.masks import MaskManager

    layer, scores, proposal = rank_inputs(current().rank)
    manager = MaskManager(nn.Sequential(layer), dense_layers=())
    manager.set_masks({"0": proposal})
    after_set = manager.mask("0").clone()
    manager.drop_and_grow("0", 20, scores)
    return {"after_set": after_set, "after_drop_and_grow": manager.mask("0").clone(),
            "zeros_where_masked": bool((layer.weight[~manager.mask("0")] == 0).all())}


def max_weight_gap(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Largest |difference| between two state dicts, over the positions where both runs keep the weight."""
    worst = 0.0
    for key, value in reference.items():
        if key.endswith("_mask"):
            continue
        gap = (state[key].float() - value.float()).abs()
        mask_key = f"{key}_mask"
        if mask_key in reference:
            gap = gap[state[mask_key] == reference[mask_key]]
        worst = max(worst, float(gap.max()))
    return worst


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), TQDM_DISABLE="1")
    torch.set_num_threads(1)
    result = train_tiny("rigl", RIGL_PARAMS, STEPS)
    result["decisions"] = mask_decisions()
    result["rank"] = current().rank
    torch.save(result, Path(out) / f"rank{rank}.pt")


def test_two_processes_keep_rigl_masks_identical_and_match_one_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    reference = train_tiny("rigl", RIGL_PARAMS, STEPS)  # this process: one rank, the same global batch

    # RigL updated the masks (delta_t 5 within 75 % of 20 steps) and every rank holds the same ones
    assert ranks[0]["regrown"] == ranks[1]["regrown"] and sum(ranks[0]["regrown"]) > 0
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
    # ... and the same weights: DDP averaged the two shards' gradients
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key

    # two processes with the global batch = one process: same loss, same mask updates, weights within fp noise
    assert ranks[0]["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert ranks[0]["regrown"] == reference["regrown"]
    agreement = sum(int((ranks[0]["masks"][n] == m).sum()) for n, m in reference["masks"].items())
    assert agreement / sum(m.numel() for m in reference["masks"].values()) > 0.999
    # masks were compared above: a near-tie in |w| may flip a handful of positions, and a weight there is
    # zero in one run and freshly regrown in the other, so weights are compared where the masks agree
    assert max_weight_gap(ranks[0]["state"], reference["state"]) < 1e-3

    # rank-dependent inputs: rank 0 decides, every rank applies rank 0's decision
    decisions = [r["decisions"] for r in ranks]
    for key in ("after_set", "after_drop_and_grow"):
        assert torch.equal(decisions[0][key], decisions[1][key]), key
    assert all(d["zeros_where_masked"] for d in decisions)
    alone = mask_decisions()  # what rank 0's inputs give in one process
    assert torch.equal(decisions[0]["after_drop_and_grow"], alone["after_drop_and_grow"])
    _, _, rank1_proposal = rank_inputs(1)
    assert not torch.equal(decisions[1]["after_set"], rank1_proposal)  # rank 1's own proposal was overridden


@pytest.mark.slow
def test_torchrun_run_writes_one_record_that_matches_one_process(tiny_config, tmp_path):
    """``torchrun --nproc-per-node 2 -m diffprune_bench.cli run``: one record, as one process would write."""
    from diffprune_bench.harness import run
    from diffprune_bench.results import load_records

    single = run(tiny_config(method="static", sparsity=0.5, run_id="single"))[0]
    cfg = tiny_config(method="static", sparsity=0.5)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "diffprune_bench.cli", "run", "--method", "static",
               "--sparsity", "0.5", "--results-dir", str(tmp_path / "multi"), "--cache-dir", cfg.cache_dir,
               "--base-steps", str(cfg.base_steps), "--scratch-steps", str(cfg.scratch_steps),
               "--batch-size", str(cfg.batch_size), "--device", "cpu",
               "--sample-steps", str(cfg.sample_steps), "--num-samples", str(cfg.num_samples),
               "--latency-repeats", "1", "--latency-batch", str(cfg.latency_batch)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = load_records(tmp_path / "multi")  # one run folder, one record: rank 1 wrote nothing
    assert record["status"] == "ok"
    assert record["device"]["processes"] == 2 and record["device"]["backend"] == "gloo"
    assert single["device"]["processes"] == 1
    assert record["training"]["images_seen"] == single["training"]["images_seen"]
    assert record["training"]["final_loss"] == pytest.approx(single["training"]["final_loss"], rel=1e-4)
    assert record["metrics"]["params_nonzero"] == single["metrics"]["params_nonzero"]
    assert record["metrics"]["fid"] == pytest.approx(single["metrics"]["fid"], rel=0.02)
    assert not (Path(record["paths"]["run_dir"]) / ".writer.lock").exists()  # rank 0 released its claim
