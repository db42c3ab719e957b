"""The harness: one run's pipeline, the same for every method (DESIGN.md section 3).

config -> dataset -> dense base (:mod:`base_model`) -> method.prepare -> Trainer -> method.export ->
evaluate (:mod:`evaluator`: samples, FID, KID, MACs, params, latency, consistency) -> record. A failure anywhere after
the run directory exists still writes a record with ``status: failed`` and the reason.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import platform
import shutil
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffprune_bench import __version__
from diffprune_bench.base_model import BaseModel, get_base_model, make_context, seed_everything
from diffprune_bench.code_digest import code_digest
from diffprune_bench.config import RunConfig, resume_refusal
from diffprune_bench.context import MethodContext
from diffprune_bench.data import get_dataset_spec, load_dataset
from diffprune_bench.distributed import current as current_distributed
from diffprune_bench.errors import BenchError
from diffprune_bench.evaluator import FEATURES_NAME, SAMPLES_NAME, Evaluator
from diffprune_bench.export import export_pipeline
from diffprune_bench.machine import cpu_description, device_name
from diffprune_bench.metrics.fid import resolve_inception_weights
from diffprune_bench.metrics.latency import MachineLock
from diffprune_bench.models import build_model, check_data_fits
from diffprune_bench.preflight import check_batch_fits, check_before_work, warn_few_samples
from diffprune_bench.progress import progress_bar
from diffprune_bench.registry import Deployable, Method, create_method
from diffprune_bench.results import (
    ensure_writable,
    git_commit,
    new_run_id,
    utc_now,
    warn,
    write_config,
    write_record,
)
from diffprune_bench.rundir import claim_run_dir
from diffprune_bench.targets import target_report
from diffprune_bench.trained_cache import entry_path, load_trained, store_trained
from diffprune_bench.trainer import Trainer


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill every unset option from the dataset's protocol defaults.

    A dataset may default to a shipped base (fashion-mnist); ``--base train`` trains and caches one instead
    (``base_steps`` then sizes it; beside a pretrained base it only names the base's budget in tables).
    """
    defaults = get_dataset_spec(cfg.dataset).defaults
    changes = {k: v for k, v in defaults.items() if hasattr(cfg, k) and getattr(cfg, k) is None}
    return cfg.replace(**changes)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def check_precision(device: torch.device, precision: str) -> None:
    """fp16 on a CPU is refused: CPUs have no fast fp16 kernels (a run measured 0.19x the fp32 speed) and
    the loss scaler only works on CUDA, so its rows would only mislead. bf16 on a CPU runs (autocast
    supports it, and CPUs with AMX or AVX-512 BF16 gain from it) but often slower: one warning line."""
    if device.type != "cpu" or precision == "fp32":
        return
    if precision == "fp16":
        raise BenchError("precision 'fp16' needs a CUDA GPU (CPUs have no fast fp16 kernels); "
                         "on the CPU use --precision fp32 or bf16")
    warn(f"precision {precision!r} on the CPU is often slower than fp32 unless the CPU has bf16 "
         "instructions (AMX, AVX-512 BF16)")


def scratch_budget(cfg: RunConfig) -> int:
    """Training steps of a method that starts from scratch: ``scratch_steps``, or the base's budget."""
    return cfg.scratch_steps if cfg.scratch_steps is not None else cfg.base_steps


# ---------------------------------------------------------------- one run
def _save_model(model: nn.Module, folder: Path, cfg: RunConfig) -> dict[str, str]:
    """A pipeline folder plain diffusers loads (see :mod:`diffprune_bench.export`); paths for the record."""
    try:
        return export_pipeline(model, folder, cfg.sample_steps, cfg.timestep_spacing)
    except Exception:  # wrapped models (slimmable widths): fall back to the raw state dict
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "state_dict.pt")
    return {"model": str(folder)}


def _variant_dir(run_dir: Path, label: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)
    return run_dir.with_name(f"{run_dir.name}-{safe}")


def check_resume(cfg: RunConfig) -> None:
    """``resume`` needs the run's training checkpoint: refuse now, before any data load or training."""
    from diffprune_bench.trainer import CHECKPOINT_NAME

    if not cfg.resume:
        return
    if cfg.run_id is None:
        raise BenchError("--resume needs --run-id: the id of the run folder whose checkpoint to continue")
    checkpoint = Path(cfg.results_dir) / cfg.run_id / "checkpoint" / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise BenchError(f"--resume: no checkpoint at {checkpoint}; run once without --resume")


def run(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run one (method, dataset, sparsity, seed) cell; returns its record(s), also written to disk."""
    cfg = resolve_config(cfg.validate())
    check_before_work(cfg)  # sizes, the schedule, a finished run under this id: refused before any work
    with fixed_threads(cfg.threads):
        return _run_validated(cfg)


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op CPU threads (None: leave torch's), restored afterwards: FIDs reproduce
    bit-for-bit only at one thread count, so the count is part of the run's configuration."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_validated(cfg: RunConfig) -> list[dict[str, Any]]:
    method: Method = create_method(cfg.method, cfg.method_params, sparsity=cfg.sparsity)
    check_resume(cfg)
    dist = current_distributed()
    device = dist.setup(select_device(cfg.device))  # this rank's device when launched on several processes
    check_precision(device, cfg.precision)
    name = f"{cfg.method}+{cfg.then}" if cfg.then else cfg.method
    run_id = cfg.run_id or dist.broadcast_object(new_run_id(name, cfg.dataset, cfg.sparsity, cfg.seed))
    run_dir = Path(cfg.results_dir) / run_id
    if dist.is_main:  # a read-only results folder is a usage error now, not a lost record later
        ensure_writable(cfg.results_dir, "run records", "--results-dir")
    if cfg.resume:  # before anything is written: a resume continues the same run or none
        refusal = dist.broadcast_object(resume_refusal(run_dir / "config.yaml", cfg) if dist.is_main else None)
        if refusal is not None:
            raise BenchError(refusal)
    claim = claim_run_dir(run_dir, dist)  # one writer per run folder (RunDirBusy otherwise), rank 0 only
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        warn_few_samples(cfg)  # the run goes ahead: say once that few samples bias its FID
        write_config(run_dir, cfg.to_dict())
    record: dict[str, Any] = {
        "run_id": run_id,
        "status": "running",
        "started_at": utc_now(),
        "git_commit": git_commit(),
        "code_digest": code_digest(),  # what the latency and shared-training caches are keyed by
        "harness_version": __version__,
        "method": cfg.method,
        "method_label": method.display_name or method.name,
        "family": method.family,
        "init": method.init,
        "is_baseline": method.is_baseline,
        "takes_sparsity": method.takes_sparsity,
        "method_params": _params_dict(method),
        **({"then": cfg.then} if cfg.then else {}),
        "dataset": cfg.dataset,
        "preset": cfg.preset,
        "sparsity": cfg.sparsity,
        "seed": cfg.seed,
        "suite": cfg.suite,
        "device": {"type": device.type, "name": device_name(device), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "platform": platform.platform(), "cpu": cpu_description(),
                   **dist.describe()},
        "config": cfg.to_dict(),
        "paths": {"run_dir": str(run_dir)},
    }
    lock = MachineLock(cfg.cache_dir)  # shared while computing; latency waits for exclusive use
    try:
        with lock.computing():
            return _run(cfg, method, device, run_dir, record, lock)
    except Exception as error:  # noqa: BLE001 - every failure must leave a record
        record.update(status="failed", finished_at=utc_now(), error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc(limit=8))
        if dist.is_main:
            error.failed_record = _write_failed_record(run_dir, record)  # type: ignore[attr-defined]
        raise
    finally:
        lock.close()
        claim.release()


def _run(cfg: RunConfig, method: Method, device: torch.device, run_dir: Path, record: dict[str, Any],
         lock: MachineLock | None = None) -> list[dict]:
    seed_everything(cfg.seed)
    dist = current_distributed()
    with dist.main_process_first():  # one download; the other ranks then read what it wrote
        data = load_dataset(cfg.dataset, root=cfg.data_root, download=cfg.download, resolution=cfg.resolution)
    check_data_fits(cfg.preset, data.shape)
    check_batch_fits(cfg, len(data.train))  # datasets whose size preflight could not know (image folders)
    if cfg.fid_extractor == "inception-v3":  # missing weights fail now, not after hours of training
        resolve_inception_weights(cfg.inception_weights, cfg.cache_dir)
    record["data"] = {"source": data.source, "train_images": len(data.train), "resolution": data.resolution}
    base = get_base_model(cfg, data, device)
    record["base"] = {k: base.info.get(k) for k in ("source", "hash", "cached", "train", "pretrained")}
    evaluator = (Evaluator(cfg, data, device, base, lock)
                 if dist.is_main else None)  # rank 0 alone evaluates
    record["protocol"] = evaluator.protocol() if evaluator else None

    seed_everything(cfg.seed)
    shared = entry_path(cfg, record["code_digest"]) if cfg.share_training else None
    stored = load_trained(shared, device) if shared is not None else None  # another cell trained this model
    steps = training_budget(cfg, method)
    model = starting_model(cfg, method, base, device) if stored is None else None
    starts_from_base = method.init == "pretrained" and not method.is_baseline  # its teacher: a lazy copy
    ctx = make_context(cfg, data, device, steps, base=base.model if starts_from_base else None,
                       score_fid=evaluator and evaluator.score_fid,
                       progress=lambda it, **kw: progress_bar(it, leave=False, **kw))
    if stored is not None:
        if not dist.is_main:
            return []
        deployables = stored["deployables"]
        train_cost = {**stored["training"], "reused_from": stored["run_id"]}
    else:
        model, train_cost = _train(cfg, method, model, ctx, base, run_dir)
        if not dist.is_main:  # the other ranks only trained: rank 0 exports, evaluates and records
            return []
        exported = method.export(model, ctx)
        deployables = exported if isinstance(exported, list) else [exported]
        if shared is not None:
            store_trained(shared, deployables, train_cost, run_dir.name)
    if cfg.then:
        deployables = [compose_then(cfg, deployable, ctx) for deployable in deployables]

    records = []
    reference = evaluator.reference_paths(Path(cfg.results_dir))  # every feature space's, by extractor
    for index, deployable in enumerate(deployables):
        target_dir = run_dir if index == 0 else _variant_dir(run_dir, deployable.label or str(index))
        target_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        metrics = evaluator.evaluate(deployable, method.is_baseline, target_dir)
        requested = deployable.sparsity if deployable.sparsity is not None else cfg.sparsity
        variant = dict(record)
        variant.update(
            run_id=target_dir.name,
            train_run_id=run_dir.name,
            variant=deployable.label or None,
            sparsity=requested,
            status="ok",
            finished_at=utc_now(),
            training=train_cost,
            method_info=deployable.info,
            metrics=metrics,
            target=target_report(requested, metrics.get("macs_reduction")),  # requested vs realised saving
            eval_wall_s=round(time.perf_counter() - started, 3),
            paths={"run_dir": str(target_dir), "samples": str(target_dir / "samples.png"),
                   "features": str(target_dir / FEATURES_NAME), "samples_uint8": str(target_dir / SAMPLES_NAME),
                   "reference_features": reference[evaluator.extractor.name],
                   "reference_features_by_extractor": reference,
                   **_save_model(deployable.exportable(), target_dir / "model", cfg)},
        )
        if index > 0:
            write_config(target_dir, cfg.to_dict())
        write_record(target_dir, variant)
        records.append(variant)
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    return records


def training_budget(cfg: RunConfig, method: Method) -> int:
    """Optimizer steps the method trains for: none without training, the fine-tune budget from the base,
    the scratch budget (or the fine-tune one, ``budget = "finetune"``) from scratch."""
    if method.is_baseline or method.sampler_level:
        return 0
    if method.init == "pretrained" or method.budget == "finetune":
        return cfg.finetune_steps
    return scratch_budget(cfg)


def starting_model(cfg: RunConfig, method: Method, base: BaseModel, device: torch.device) -> nn.Module:
    """What the method starts from: the base as it is (training-free), a copy of it, or a fresh UNet."""
    if method.is_baseline or method.sampler_level:
        return base.model
    if method.init == "pretrained":
        return copy.deepcopy(base.model).train()
    return build_model(cfg.preset, seed=cfg.seed).to(device)


def _train(cfg: RunConfig, method: Method, model: nn.Module, ctx: MethodContext, base: BaseModel,
           run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The method's ``prepare`` and its training budget; returns the trained model and the training cost."""
    model = method.prepare(model, ctx)
    if method.is_baseline:
        return model, base.info.get("train") or {}
    if method.sampler_level:
        return model, {"optimizer_steps": 0, "batch_size": cfg.batch_size, "images_seen": 0, "wall_s": 0.0}
    trainer = Trainer(model, method, ctx, lr=cfg.lr, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
                      precision=cfg.precision, checkpoint_dir=run_dir / "checkpoint",
                      checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                      checkpoint_every_s=cfg.checkpoint_every_s,
                      description=f"{cfg.method} s={cfg.sparsity:g}",
                      channels_last=cfg.channels_last, compile=cfg.compile)
    return model, trainer.train().as_dict()


def compose_then(cfg: RunConfig, deployable: Deployable, ctx: MethodContext) -> Deployable:
    """``deployable`` made faster by the run's sampler-level ``then`` method.

    The two savings multiply: the trained part keeps (1 - s) of the dense per-step MACs and the sampler
    part keeps (1 - t) of the steps' MACs, so the composed row's target is 1 - (1 - s)(1 - t); the
    trajectory MACs the harness counts are the pruned per-step MACs summed over the new schedule."""
    then = create_method(cfg.then, cfg.then_params)
    faster = then.accelerate(deployable, dataclasses.replace(ctx, sparsity=0.0))  # its target: then_params
    trained = deployable.sparsity if deployable.sparsity is not None else cfg.sparsity
    kept = (1.0 - trained) * (1.0 - float(faster.info.get("saving_target", 0.0)))
    faster.sparsity = round(1.0 - kept, 4)
    faster.info = {**deployable.info, "then": {"method": cfg.then, "params": _params_dict(then), **faster.info}}
    return faster


def _write_failed_record(run_dir: Path, record: dict[str, Any]) -> str | None:
    """Write the failed record; its path, or None when the folder refused it (the CLI says which)."""
    try:
        return str(write_record(run_dir, record))
    except OSError:
        return None


def _params_dict(method: Method) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(method.params) if dataclasses.is_dataclass(method.params) else {}
