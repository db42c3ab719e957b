"""One run on several processes: the glue between the harness and Hugging Face Accelerate (DDP).

Launch any run with ``accelerate launch --multi_gpu --num_processes N -m diffprune_bench.cli run ...``
or ``torchrun --nproc-per-node N -m diffprune_bench.cli run ...`` (on CPUs use torchrun: accelerate's
``--cpu`` launches one process); a SLURM sweep with ``--gpus-per-run N`` starts its tasks through
submitit, which exports the same variables. Accelerate joins the process group from them (NCCL on GPUs,
gloo on CPUs) and gives each rank its device. When ``WORLD_SIZE`` says one process, nothing here
touches torch.distributed and every call is the identity, so a single-process run is exactly what it
was before this module existed.

The contract that keeps N processes equivalent to one process with the same global batch:

- **Data**: every rank reads the *same* global batch from the seeded loader and keeps its slice
  (:meth:`Distributed.local_shard`), so a method's ``prepare`` (Taylor / Diff-Pruning importance,
  mask draws) sees identical data and takes identical decisions on every rank.
- **Noise**: inside a training step, ``ctx.loss_fn`` draws noise and timesteps for the global batch
  from the shared seeded generator and keeps this rank's slice (:meth:`Distributed.draw_noise`), so
  the N shards together see exactly the noise one process would have drawn.
- **Gradients**: the loss runs through ``DistributedDataParallel`` (:class:`ModelDDP`), which
  all-reduces (averages) gradients during ``backward``; with equal shards the average of the local
  means is the global mean, and every hook after ``backward`` (RigL's dense gradient, clipping, the
  optimizer) sees the same gradient on every rank.
- **Masks**: whatever a method decides from weights and gradients is decided on rank 0 and
  broadcast (:meth:`Distributed.broadcast_`), so a tie broken differently by a non-deterministic kernel
  can never leave ranks with different sparse networks. ``MaskManager`` does this for RigL / MagRan /
  Static; a method may call ``ctx.distributed.broadcast_`` / ``all_reduce_mean_`` on tensors or
  ``broadcast_object`` on any other decision (a channel selection) itself. Methods that draw their
  own training noise should take it from ``ctx.noise_and_timesteps(x0)``.
- **Files**: only rank 0 (``is_main``) writes records, checkpoints and caches.

Buffers are not re-broadcast at every forward (DDP's ``broadcast_buffers``): the UNets have no
running statistics, the only buffers are masks, and those are synchronised where they change.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from diffprune_bench.errors import BenchError

#: how long a rank waits for the others at a collective before giving up (rank 0 alone builds the
#: evaluator and may train the digits feature extractor while the other ranks wait at the first step)
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


def world_size_from_env() -> int:
    """The number of processes the launcher (accelerate launch, torchrun, submitit) announced."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise BenchError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be a positive integer") from None


class Distributed:
    """A single process: every operation is the identity (the default everywhere)."""

    world_size: int = 1
    rank: int = 0
    backend: str | None = None

    def __init__(self) -> None:
        self.sharding = False  # True inside a training step, where batches are this rank's shard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def setup(self, device: torch.device) -> torch.device:
        """Start the process group for ``device`` (once) and return this rank's device."""
        return device

    def describe(self) -> dict[str, Any]:
        """What a record says about the processes that trained the run."""
        return {"processes": self.world_size, "backend": self.backend}

    # -- the model
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the loss runs through (DistributedDataParallel when distributed)."""
        return model

    # -- data
    def shard_slice(self, global_size: int) -> slice:
        """This rank's rows of a global batch of ``global_size`` rows."""
        if global_size % self.world_size:
            raise BenchError(
                f"batch size {global_size} is not divisible by the {self.world_size} processes; "
                f"use a multiple of {self.world_size}"
            )
        local = global_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def local_shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global ``batch`` (all of it in a single process)."""
        if not self.enabled:
            return batch
        return batch[self.shard_slice(batch.shape[0])]

    @contextlib.contextmanager
    def sharded_step(self) -> Iterator[None]:
        """Marks a training step: ``ctx.loss_fn`` then draws the global batch's noise (see the module doc)."""
        previous, self.sharding = self.sharding, self.enabled
        try:
            yield
        finally:
            self.sharding = previous

    def draw_noise(
        self,
        x0: torch.Tensor,
        num_train_timesteps: int,
        generator: torch.Generator | None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps for ``x0``, drawn in ``diffusion_loss``'s order (noise, then timesteps).

        Inside a sharded step the draw covers the global batch and this rank keeps its slice, so the
        generator advances exactly as in one process and the shards' noise is the one process's noise."""
        from diffprune_bench.diffusion import draw_training_noise

        rows = x0.shape[0] * (self.world_size if self.sharding else 1)
        part = self.shard_slice(rows) if self.sharding else slice(None)
        drawn_noise, drawn_steps = draw_training_noise((rows, *x0.shape[1:]), num_train_timesteps, generator,
                                                       x0.device, x0.dtype, noise, timesteps)
        return (noise if noise is not None else drawn_noise[part],
                timesteps if timesteps is not None else drawn_steps[part])

    # -- collectives (identity here)
    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` in place with rank ``src``'s value (decide on rank 0, apply everywhere)."""
        return tensor

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` in place with its mean over ranks."""
        return tensor

    def mean(self, value: torch.Tensor) -> float:
        """The mean over ranks of a scalar tensor, as a float (the loss every rank logs and checks)."""
        return float(value)

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s value of a picklable object (a run id, a cache decision)."""
        return value

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (a download, a cache fill), then the others."""
        yield


class AccelerateDistributed(Distributed):
    """Several processes started by a launcher, joined through Accelerate's process group."""

    def __init__(self) -> None:
        super().__init__()
        self.world_size = world_size_from_env()
        self.rank = int(os.environ.get("RANK", "0"))
        self.accelerator: Any = None
        self.device: torch.device | None = None

    def setup(self, device: torch.device) -> torch.device:
        if self.accelerator is not None:
            if device.type != self.device.type:
                raise BenchError(
                    f"device {device.type!r} differs from {self.device.type!r}, the process group's device"
                )
            return self.device
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        cpu = device.type == "cpu"
        self.backend = "gloo" if cpu else "nccl"
        self.accelerator = Accelerator(
            cpu=cpu,
            kwargs_handlers=[InitProcessGroupKwargs(backend=self.backend, timeout=COLLECTIVE_TIMEOUT)],
        )
        state = self.accelerator.state
        self.world_size, self.rank = state.num_processes, state.process_index
        self.device = torch.device("cpu") if cpu else self.accelerator.device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        return self.device

    def _group(self) -> None:
        if self.accelerator is None:  # a collective before the harness picked a device: default one
            self.setup(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self._group()
        if not any(p.requires_grad for p in model.parameters()):
            return model
        # DDP checks that every rank holds the same parameter shapes and copies rank 0's values to all;
        # buffers (masks) are not re-sent at every forward: they are broadcast where they change
        buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                   else {"broadcast_buffers": False})
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return ModelDDP(model, device_ids=device_ids, **buffers)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._group()
        # bool tensors travel as uint8: not every backend reduces or broadcasts bool
        payload = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
        torch.distributed.broadcast(payload, src=src)
        if payload is not tensor:
            tensor.copy_(payload.to(torch.bool))
        return tensor

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._group()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor.div_(self.world_size)

    def mean(self, value: torch.Tensor) -> float:
        total = value.detach().float().reshape(1).clone()
        return float(self.all_reduce_mean_(total))

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        self._group()
        box = [value]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        self._group()
        with self.accelerator.main_process_first():
            yield


class ModelDDP(nn.parallel.DistributedDataParallel):
    """DDP that lets a method's loss read its model's own attributes through the wrapper (a slimmable
    supernet's width state, a diffusers config), as it can through ``torch.compile``'s wrapper."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


_DDP_ARGS = set(inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters)
_CURRENT: Distributed | None = None


def current() -> Distributed:
    """This process's :class:`Distributed` (single-process unless a launcher set ``WORLD_SIZE`` > 1).

    The harness calls ``current().setup(device)`` once per run, which joins the process group and
    returns this rank's device (``cuda:LOCAL_RANK``, or the CPU with the gloo backend)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = AccelerateDistributed() if world_size_from_env() > 1 else Distributed()
    return _CURRENT

