"""The harness: one loop that runs any method the same way (DESIGN.md section 3).

config -> dataset -> dense base (cached) -> method.prepare -> Trainer -> method.export ->
evaluate (samples, FID, KID, MACs, params, latency, consistency) -> record. A failure anywhere after
the run directory exists still writes a record with ``status: failed`` and the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.utils import save_image

from diffprune_bench import __version__
from diffprune_bench.config import RunConfig, resume_refusal
from diffprune_bench.context import MethodContext, infinite_batches
from diffprune_bench.data import DataBundle, get_dataset_spec, image_batches, load_dataset
from diffprune_bench.diffusion import ddim_sample, initial_noise, make_noise_scheduler, sampler_protocol
from diffprune_bench.distributed import current as current_distributed
from diffprune_bench.errors import BenchError
from diffprune_bench.export import export_pipeline
from diffprune_bench.metrics.consistency import mean_ssim
from diffprune_bench.metrics.fid import (
    FeatureExtractor,
    build_extractor,
    extract_features,
    fid_from_features,
    kid_from_features,
    reference_stats,
    resolve_inception_weights,
)
from diffprune_bench.metrics.graph_latency import LatencyStore, measurement_key, trajectory_signature
from diffprune_bench.metrics.latency import MachineLock, measure_ab
from diffprune_bench.metrics.macs import COUNTER, count_macs, trajectory_macs
from diffprune_bench.models import build_model, check_data_fits, count_params, load_pretrained_with_info, weights_hash
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
from diffprune_bench.trained_cache import entry_path, load_trained, store_trained
from diffprune_bench.trainer import Trainer, autocast

CONSISTENCY_SAMPLES = 64
FEATURES_NAME = "features.npy"  # per-sample extractor features of the evaluation samples (noise order)
EVAL_NOISE_OFFSET = 10_000  # evaluation noise seed = run seed + offset: never the training stream
SEARCH_NOISE_OFFSET = 20_000  # a method's own FID search (DDSM) never sees the evaluation noise


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill every unset option from the dataset's protocol defaults."""
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


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ---------------------------------------------------------------- dense base
@dataclass
class BaseModel:
    model: nn.Module
    info: dict[str, Any]


def base_cache_key(cfg: RunConfig, data: DataBundle | None = None) -> str:
    """Hash of what determines a trained base: dataset (and its content fingerprint where the name alone does
    not fix it: image folders, resolutions), preset, train budget, seed (and recipe)."""
    key = {
        "dataset": cfg.dataset,
        "preset": cfg.preset,
        "steps": cfg.base_steps,
        "batch": cfg.batch_size,
        "lr": cfg.lr,
        "ema": cfg.ema_decay,
        "grad_clip": cfg.grad_clip,
        "seed": cfg.seed,
        "recipe": 1,
    }
    if data is not None and data.fingerprint:
        key["data"] = data.fingerprint
    if cfg.precision != "fp32":  # a bf16/fp16-trained base is another base (fp32 keys stay as they were)
        key["precision"] = cfg.precision
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def make_context(
    cfg: RunConfig, data: DataBundle, device: torch.device, total_steps: int, **fields: Any
) -> MethodContext:
    """The context of a run: its data, seeded generator, noise schedule and MAC counter (``fields``: the
    optional ones, e.g. ``base``, ``score_fid``, ``progress``)."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return MethodContext(
        device=device,
        sparsity=cfg.sparsity,
        total_steps=total_steps,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        noise_scheduler=make_noise_scheduler(),
        sample_shape=data.shape,
        sample_steps=cfg.sample_steps,
        timestep_spacing=cfg.timestep_spacing,
        batches=infinite_batches(data.train, cfg.batch_size, cfg.seed, device, cfg.num_workers),
        generator=generator,
        count_macs=lambda model: float(count_macs(model, data.shape).total),
        **fields,
    )


def get_base_model(cfg: RunConfig, data: DataBundle, device: torch.device) -> BaseModel:
    """The dense base every method starts from: a pretrained checkpoint, or ours, trained once and cached
    (a damaged cache entry is trained again, with a warning, rather than failing every run that reads it)."""
    from diffprune_bench.errors import first_line
    from diffprune_bench.filemodes import honour_umask
    from diffprune_bench.results import warn

    if cfg.base:
        model, loaded = load_pretrained_with_info(cfg.base, cfg.preset)
        model = model.to(device).eval()
        return BaseModel(model, {"source": cfg.base, "hash": weights_hash(model), "cached": True, "train": None,
                                 "pretrained": loaded})
    key = base_cache_key(cfg, data)
    folder = Path(cfg.cache_dir) / "bases" / key
    if current_distributed().broadcast_object((folder / "base.json").is_file()):  # rank 0 decides for all
        from diffusers import UNet2DModel

        try:
            model = UNet2DModel.from_pretrained(folder / "model").to(device).eval()
            info = json.loads((folder / "base.json").read_text())
            return BaseModel(model, {**info, "cached": True})
        except Exception as error:  # noqa: BLE001 - a damaged cache entry only costs a retrain
            warn(f"cached base {folder} is unreadable ({first_line(error)}); training it again")
            if current_distributed().is_main:
                shutil.rmtree(folder, ignore_errors=True)
    seed_everything(cfg.seed)
    model = build_model(cfg.preset, seed=cfg.seed).to(device)
    ctx = make_context(cfg, data, device, cfg.base_steps)
    trainer = Trainer(model, Method(), ctx, lr=cfg.lr, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
                      precision=cfg.precision, description=f"train dense base ({cfg.dataset}/{cfg.preset})",
                      channels_last=cfg.channels_last, compile=cfg.compile)
    stats = trainer.train()
    info = {"source": f"trained:{key}", "key": key, "hash": weights_hash(model), "train": stats.as_dict(),
            "preset": cfg.preset, "dataset": cfg.dataset, "seed": cfg.seed}
    if not current_distributed().is_main:  # every rank trained the same base; rank 0 alone caches it
        return BaseModel(model.eval(), {**info, "cached": False})
    tmp = folder.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    (tmp / "base.json").write_text(json.dumps(info, indent=2))
    honour_umask(tmp)  # safetensors writes its files 0600
    try:
        tmp.rename(folder)
    except OSError:  # another process cached the same base first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return BaseModel(model.eval(), {**info, "cached": False})


# ---------------------------------------------------------------- evaluation
class Evaluator:
    """Measures a Deployable under the run's protocol; built once per run, reused for every variant."""

    def __init__(self, cfg: RunConfig, data: DataBundle, device: torch.device, base: BaseModel,
                 lock: MachineLock | None = None, code_version: str | None = None) -> None:
        self.cfg, self.data, self.device, self.base = cfg, data, device, base
        self.extractor: FeatureExtractor = build_extractor(
            cfg.fid_extractor, cfg.cache_dir, weights=cfg.inception_weights, device=device
        )
        self.reference = reference_stats(
            self.extractor, lambda: image_batches(data.reference, num_workers=cfg.num_workers), cfg.cache_dir,
            {"dataset": data.name, "split": "reference", "resolution": data.resolution, "source": data.source},
            precomputed=data.cleanfid_stats,
        )
        floor_images = image_batches(data.train, limit=cfg.num_samples, num_workers=cfg.num_workers)
        self.floor = fid_from_features(extract_features(self.extractor, floor_images), self.reference)
        self._compiled: dict[int, tuple[nn.Module, nn.Module]] = {}
        self.noise = initial_noise(cfg.num_samples, data.shape, cfg.seed + EVAL_NOISE_OFFSET, device)
        self._dense_samples: torch.Tensor | None = None
        self.base_macs = count_macs(base.model, data.shape).total  # once per run, shared by every variant
        self.lock = lock
        self._search_reference = None  # training-split statistics, computed when a search first asks
        self._code_version = code_version  # a latency measured by other code is not reused (None: looked up)
        self._latency_context: tuple[str, dict[str, Any]] | None = None

    def protocol(self) -> dict[str, Any]:
        return {
            "fid": "clean-fid (uint8 quantisation, clean PIL-bicubic resize when needed)",
            "extractor": self.extractor.name,
            "extractor_fingerprint": self.extractor.fingerprint(),
            "extractor_protocol": self.extractor.describe(),
            "reference": {"dataset": self.data.name, "split": self.data.reference_split,
                          "images": len(self.data.reference), "source": self.data.source, **self.reference.info},
            "num_samples": self.cfg.num_samples,
            "sampler": {**sampler_protocol(self.cfg.sample_steps, self.cfg.timestep_spacing),
                        "precision": self.cfg.precision},
            "fid_floor": self.floor,
        }

    def save_reference_features(self, results_dir: Path) -> str:
        """The reference statistics FID used (mean, covariance) and the reference features KID used, once per
        results folder: the leaderboard's paired statistics recompute FID/KID from them. Named by extractor
        fingerprint and content."""
        mu, sigma = np.asarray(self.reference.mu), np.asarray(self.reference.sigma)
        features = np.asarray(self.reference.features, dtype=np.float32)
        digest = hashlib.sha256(features.tobytes() + mu.tobytes() + sigma.tobytes()).hexdigest()[:12]
        path = results_dir / "reference" / f"{self.extractor.fingerprint()[:8]}-{digest}.npz"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:
                np.savez(handle, mu=mu, sigma=sigma, features=features)
            os.replace(tmp, path)
        return str(path)

    def sample(self, deployable: Deployable, noise: torch.Tensor, show: bool = False) -> torch.Tensor:
        progress = (lambda it: progress_bar(it, desc="sampling", unit="batch", leave=False)) if show else None
        if self.cfg.channels_last:
            noise = noise.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.cfg.precision):
            return ddim_sample(self._step_modules(deployable), noise, self.steps_of(deployable),
                               self.cfg.timestep_spacing, progress=progress)

    def steps_of(self, deployable: Deployable) -> int:
        """The DDIM steps ``deployable`` samples with: its own (fewer-steps methods) or the protocol's."""
        return deployable.sample_steps or self.cfg.sample_steps

    def _step_modules(self, deployable: Deployable):
        """The deployable's per-step modules, each compiled once when the run asks for ``compile``."""
        if not self.cfg.compile:
            return deployable.module_for_step

        def pick(step: int) -> nn.Module:
            module = deployable.module_for_step(step)
            if id(module) not in self._compiled:  # the module is kept in the entry, so its id stays unique
                self._compiled[id(module)] = (module, torch.compile(module))
            return self._compiled[id(module)][1]

        return pick

    def score_fid(self, deployable: Deployable, num_samples: int) -> float:
        """FID of ``num_samples`` samples: what a method's search (DDSM) may call.

        Its noise is seeded apart from the evaluation noise and it is scored against the training split's
        statistics, never the evaluation reference, so a search cannot select for the very samples or
        reference its record is scored on; every call gets the same noise (fair comparisons)."""
        noise = initial_noise(num_samples, self.data.shape, self.cfg.seed + SEARCH_NOISE_OFFSET, self.device)
        samples = self.sample(deployable, noise)
        return fid_from_features(self.extractor.features(samples), self.search_reference())

    def search_reference(self):
        """Statistics of the training split (cached like the reference's): what :meth:`score_fid` scores against."""
        if self._search_reference is None:
            data = self.data
            self._search_reference = reference_stats(
                self.extractor, lambda: image_batches(data.train, num_workers=self.cfg.num_workers), self.cfg.cache_dir,
                {"dataset": data.name, "split": "train", "resolution": data.resolution, "source": data.source},
            )
        return self._search_reference

    def dense_samples(self) -> torch.Tensor:
        if self._dense_samples is None:
            self._dense_samples = self.sample(Deployable(self.base.model), self.noise[:CONSISTENCY_SAMPLES])
        return self._dense_samples

    def latency_context(self) -> tuple[str, dict[str, Any]]:
        """The dense trajectory's graph signature and what else sets a trajectory's time: the same for every
        deployable of the run, so computed once."""
        if self._latency_context is None:
            protocol = {
                "batch": min(self.cfg.latency_batch, self.cfg.num_samples), "repeats": self.cfg.latency_repeats,
                "threads": torch.get_num_threads(), "device": str(self.device),
                "device_name": _device_name(self.device), "host": platform.node(), "precision": self.cfg.precision,
                "channels_last": self.cfg.channels_last, "compile": self.cfg.compile,
                "spacing": self.cfg.timestep_spacing, "code": self._code_version or git_commit() or __version__,
            }
            dense = trajectory_signature(lambda _step: self.base.model, self.cfg.sample_steps)
            self._latency_context = (dense, protocol)
        return self._latency_context

    def latency(self, deployable: Deployable, is_baseline: bool, origin: str | None = None) -> dict[str, Any]:
        """Serial A/B timing against the dense base (see :mod:`diffprune_bench.metrics.latency`), once per
        distinct graph and protocol (see :mod:`diffprune_bench.metrics.graph_latency`)."""
        batch = self.noise[: self.cfg.latency_batch]
        dense = None if is_baseline else (lambda: self.sample(Deployable(self.base.model), batch))
        dense_signature, protocol = self.latency_context()
        key = measurement_key(trajectory_signature(deployable.module_for_step, self.steps_of(deployable)),
                              None if is_baseline else dense_signature, protocol)
        result = measure_ab(dense, lambda: self.sample(deployable, batch), self.device,
                            repeats=self.cfg.latency_repeats, threads=torch.get_num_threads(), lock=self.lock,
                            store=LatencyStore(self.cfg.cache_dir), key=key, origin=origin)
        if is_baseline:
            result.update(speedup=1.0, speedup_ci=[1.0, 1.0], dense_median_s=result["median_s"])
        return {**result, "batch": int(batch.shape[0]), "steps": self.steps_of(deployable)}

    def evaluate(self, deployable: Deployable, is_baseline: bool, run_dir: Path) -> dict[str, Any]:
        model = deployable.model
        model.eval()
        samples = self.sample(deployable, self.noise, show=True)
        features = self.extractor.features(samples)
        save_image((samples[:64] + 1) / 2, run_dir / "samples.png", nrow=8)
        report = count_macs(model, self.data.shape)
        steps = self.steps_of(deployable)  # per sample, over the whole trajectory this deployable runs
        if deployable.step_modules is not None:
            traj_dense, traj_effective = trajectory_macs(deployable.step_modules, self.data.shape)
        else:
            traj_dense, traj_effective = report.total * steps, report.effective * steps
        total, nonzero = count_params(model)
        latency = self.latency(deployable, is_baseline, origin=run_dir.name)
        np.save(run_dir / FEATURES_NAME, np.asarray(features, dtype=np.float32))  # for paired statistics
        own = samples[:CONSISTENCY_SAMPLES]
        ssim = 1.0 if is_baseline else mean_ssim(own, self.dense_samples())
        return {
            "fid": fid_from_features(features, self.reference),
            "kid": kid_from_features(features, self.reference, seed=self.cfg.seed),
            "macs_dense": report.total,
            "macs_effective": report.effective,
            "macs_trajectory": traj_dense,
            "macs_trajectory_effective": traj_effective,
            "macs_by_family": report.by_family,
            "macs_base": self.base_macs,
            "macs_reduction": 1.0 - traj_effective / (self.base_macs * self.cfg.sample_steps),
            "sample_steps": steps,
            "macs_counter": COUNTER,
            "model_hash": weights_hash(model),
            "params_total": total,
            "params_nonzero": nonzero,
            "ssim_to_dense": ssim,
            "latency": latency,
            "speedup": latency["speedup"],
            "speedup_ci": latency["speedup_ci"],
        }


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
        write_config(run_dir, cfg.to_dict())
    record: dict[str, Any] = {
        "run_id": run_id,
        "status": "running",
        "started_at": utc_now(),
        "git_commit": git_commit(),
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
        "device": {"type": device.type, "name": _device_name(device), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "platform": platform.platform(), **dist.describe()},
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
    if cfg.fid_extractor == "inception-v3":  # missing weights fail now, not after hours of training
        resolve_inception_weights(cfg.inception_weights, cfg.cache_dir)
    record["data"] = {"source": data.source, "train_images": len(data.train), "resolution": data.resolution}
    base = get_base_model(cfg, data, device)
    record["base"] = {k: base.info.get(k) for k in ("source", "hash", "cached", "train", "pretrained")}
    evaluator = (Evaluator(cfg, data, device, base, lock, code_version=record.get("git_commit"))
                 if dist.is_main else None)  # rank 0 alone evaluates
    record["protocol"] = evaluator.protocol() if evaluator else None

    seed_everything(cfg.seed)
    shared = entry_path(cfg, record.get("git_commit")) if cfg.share_training else None
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
    for index, deployable in enumerate(deployables):
        target_dir = run_dir if index == 0 else _variant_dir(run_dir, deployable.label or str(index))
        target_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        metrics = evaluator.evaluate(deployable, method.is_baseline, target_dir)
        variant = dict(record)
        variant.update(
            run_id=target_dir.name,
            train_run_id=run_dir.name,
            variant=deployable.label or None,
            sparsity=deployable.sparsity if deployable.sparsity is not None else cfg.sparsity,
            status="ok",
            finished_at=utc_now(),
            training=train_cost,
            method_info=deployable.info,
            metrics=metrics,
            eval_wall_s=round(time.perf_counter() - started, 3),
            paths={"run_dir": str(target_dir), "samples": str(target_dir / "samples.png"),
                   "features": str(target_dir / FEATURES_NAME),
                   "reference_features": evaluator.save_reference_features(Path(cfg.results_dir)),
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
