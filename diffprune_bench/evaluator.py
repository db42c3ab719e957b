"""The Evaluator: measures a Deployable under the run's protocol (DESIGN.md section 5).

Samples from fixed evaluation noise, FID/KID in the run's feature space and in the dataset's secondary
spaces, PRDC (:mod:`diffprune_bench.metrics.spaces`), MACs, params, SSIM to the dense
base, and serial latency once per distinct graph. Built once per run and reused for every variant, so the
reference statistics, the floor and the dense samples are computed once.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffprune_bench.base_model import BaseModel
from diffprune_bench.code_digest import code_digest
from diffprune_bench.config import RunConfig
from diffprune_bench.data import DataBundle, image_batches
from diffprune_bench.diffusion import ddim_sample, initial_noise, sampler_protocol
from diffprune_bench.machine import device_name
from diffprune_bench.metrics.consistency import mean_ssim
from diffprune_bench.metrics.fid import (
    FeatureExtractor,
    build_extractor,
    fid_from_features,
    quantize_uint8,
    reference_stats,
)
from diffprune_bench.metrics.graph_latency import (
    LatencyStore,
    measurement_key,
    module_signature,
    trajectory_signature,
)
from diffprune_bench.metrics.latency import MachineLock, measure_ab
from diffprune_bench.metrics.mac_cache import MacCache
from diffprune_bench.metrics.macs import COUNTER, trajectory_macs
from diffprune_bench.metrics.spaces import FeatureSpace, build_space, save_reference_features, score_spaces, space_names
from diffprune_bench.models import count_params, weights_hash
from diffprune_bench.progress import progress_bar
from diffprune_bench.registry import Deployable
from diffprune_bench.sample_cache import SampleCache
from diffprune_bench.sample_grid import sample_caption, write_sample_grid
from diffprune_bench.trainer import autocast

CONSISTENCY_SAMPLES = 64
FEATURES_NAME = "features.npy"  # per-sample extractor features of the evaluation samples (noise order)
# the N evaluation samples as clean-fid's uint8 images (noise order, NCHW): the run's raw output, small
# enough to keep (64 kB for digits) and enough to score any feature space later without the model
SAMPLES_NAME = "samples.npz"
EVAL_NOISE_OFFSET = 10_000  # evaluation noise seed = run seed + offset: never the training stream
SEARCH_NOISE_OFFSET = 20_000  # a method's own FID search (DDSM) never sees the evaluation noise


class Evaluator:
    """Measures a Deployable under the run's protocol; built once per run, reused for every variant."""

    def __init__(self, cfg: RunConfig, data: DataBundle, device: torch.device, base: BaseModel,
                 lock: MachineLock | None = None) -> None:
        self.cfg, self.data, self.device, self.base = cfg, data, device, base
        self.extractor: FeatureExtractor = build_extractor(
            cfg.fid_extractor, cfg.cache_dir, weights=cfg.inception_weights, device=device
        )
        self.reference = reference_stats(
            self.extractor, lambda: image_batches(data.reference, num_workers=cfg.num_workers), cfg.cache_dir,
            {"dataset": data.name, "split": "reference", "resolution": data.resolution, "source": data.source},
            precomputed=data.cleanfid_stats,
        )
        self.primary = FeatureSpace(self.extractor, self.reference)
        self.secondary = [build_space(name, data, cfg.cache_dir, cfg.num_workers, weights=cfg.inception_weights,
                                      device=device) for name in space_names(cfg.fid_extractor, data.name)[1:]]
        floor = reference_stats(  # cached beside the reference: the same N training images every run
            self.extractor, lambda: image_batches(data.train, limit=cfg.num_samples, num_workers=cfg.num_workers),
            cfg.cache_dir, {"dataset": data.name, "split": "train", "limit": cfg.num_samples,
                            "resolution": data.resolution, "source": data.source, "data": data.fingerprint},
        )
        self.floor = fid_from_features(floor.features, self.reference)
        self._compiled: dict[int, tuple[nn.Module, nn.Module]] = {}
        self.noise = initial_noise(cfg.num_samples, data.shape, cfg.seed + EVAL_NOISE_OFFSET, device)
        self._dense_samples: torch.Tensor | None = None
        self.macs = MacCache(cfg.cache_dir)  # fvcore traces each architecture once (see metrics.mac_cache)
        self.base_macs = self.macs.count(base.model, data.shape).total  # shared by every variant
        self.lock = lock
        self._search_reference = None  # training-split statistics, computed when a search first asks
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
        return save_reference_features(self.extractor, self.reference, results_dir)

    def reference_paths(self, results_dir: Path) -> dict[str, str]:
        """:meth:`save_reference_features` of every feature space the run scores in, by extractor name."""
        return {space.name: save_reference_features(space.extractor, space.reference, results_dir)
                for space in (self.primary, *self.secondary)}

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
        """The dense base's samples SSIM compares with: sampled once per base and protocol (see
        :mod:`diffprune_bench.sample_cache`), keyed by the base as it is now."""
        if self._dense_samples is None:
            noise = self.noise[:CONSISTENCY_SAMPLES]
            _, where = self.latency_context()  # threads, device, host, precision, spacing, code
            fields = {**{k: v for k, v in where.items() if k not in ("batch", "repeats")},
                      "base": weights_hash(self.base.model), "graph": module_signature(self.base.model),
                      "noise_seed": self.cfg.seed + EVAL_NOISE_OFFSET, "noise_count": self.cfg.num_samples,
                      "samples": int(noise.shape[0]), "shape": list(self.data.shape),
                      "sampler": sampler_protocol(self.cfg.sample_steps, self.cfg.timestep_spacing)}
            self._dense_samples = SampleCache(self.cfg.cache_dir).get_or_sample(
                fields, lambda: self.sample(Deployable(self.base.model), noise), self.device)
        return self._dense_samples

    def latency_context(self) -> tuple[str, dict[str, Any]]:
        """The dense trajectory's graph signature and what else sets a trajectory's time: the same for every
        deployable of the run, so computed once."""
        if self._latency_context is None:
            protocol = {
                "batch": min(self.cfg.latency_batch, self.cfg.num_samples), "repeats": self.cfg.latency_repeats,
                "threads": torch.get_num_threads(), "device": str(self.device),
                "device_name": device_name(self.device), "host": platform.node(), "precision": self.cfg.precision,
                "channels_last": self.cfg.channels_last, "compile": self.cfg.compile,
                "spacing": self.cfg.timestep_spacing, "code": code_digest(),  # other code: measured again
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
        primary = self.primary.score(features, self.cfg.seed)
        write_sample_grid(samples, run_dir / "samples.png", sample_caption(
            self.cfg.method, deployable.sparsity if deployable.sparsity is not None else self.cfg.sparsity,
            self.cfg.seed, primary["fid"], self.cfg.then))
        report = self.macs.count(model, self.data.shape)
        steps = self.steps_of(deployable)  # per sample, over the whole trajectory this deployable runs
        if deployable.step_modules is not None:
            traj_dense, traj_effective = trajectory_macs(deployable.step_modules, self.data.shape, self.macs.count)
        else:
            traj_dense, traj_effective = report.total * steps, report.effective * steps
        total, nonzero = count_params(model)
        latency = self.latency(deployable, is_baseline, origin=run_dir.name)
        np.save(run_dir / FEATURES_NAME, np.asarray(features, dtype=np.float32))  # for paired statistics
        save_samples_uint8(run_dir / SAMPLES_NAME, samples)
        own = samples[:CONSISTENCY_SAMPLES]
        ssim = 1.0 if is_baseline else mean_ssim(own, self.dense_samples())
        return {
            "fid": primary["fid"],
            "kid": primary["kid"],
            **score_spaces(self.primary, features, primary, self.secondary, samples, run_dir, self.cfg.seed),
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


def save_samples_uint8(path: Path, samples: torch.Tensor) -> None:
    """``samples`` (in [-1, 1]) as the uint8 images every extractor sees, compressed, written atomically."""
    images = quantize_uint8(samples.detach().float().cpu()).numpy().astype(np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, samples=images)
    os.replace(tmp, path)


def load_samples_uint8(path: Path) -> np.ndarray:
    """The uint8 NCHW samples :func:`save_samples_uint8` wrote."""
    with np.load(path) as archive:
        return archive["samples"]

