"""One training loop for every method: DDPM loss, AdamW, EMA, clipping, hooks, checkpoints, resume.

Read it top to bottom: each step draws a batch, asks the method for the loss (the plain diffusion
loss unless the method distils or trains several widths), backpropagates, lets the method see the
gradients, clips, steps the optimizer, lets the method re-apply or update masks, updates the EMA.
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError, first_line
from diffprune_bench.filemodes import atomic_write
from diffprune_bench.metrics.latency import yield_point
from diffprune_bench.progress import progress_bar
from diffprune_bench.registry import Method

CHECKPOINT_NAME = "checkpoint.pt"
#: What every checkpoint :meth:`Trainer.save_checkpoint` writes holds.
CHECKPOINT_KEYS = ("step", "model", "optimizer", "ema", "generator", "cpu_rng")
clock = time.monotonic  # what checkpoint timing reads (tests replace it to play minutes in no time)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run is recorded as failed with this message."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training, after the step in progress finished and was checkpointed.

    A ``KeyboardInterrupt``: the harness writes no failed record, so the folder stays resumable (a sweep
    resumes it; ``diffbench run --run-id <id> --resume`` too). ``checkpoint`` is where the state is (None
    when this run keeps none), ``step`` / ``total`` how far training got."""

    def __init__(self, checkpoint: Path | None, step: int, total: int) -> None:
        super().__init__(f"training interrupted at step {step} of {total}")
        self.checkpoint, self.step, self.total = checkpoint, step, total


class _InterruptFlag:
    """While training: the first SIGINT only raises a flag (the loop checkpoints the finished step and
    stops); a second one interrupts at once. Installed only where Ctrl-C would interrupt anyway (the
    main thread, Python's default handler), so workers that ignore SIGINT keep ignoring it."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: object = None

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]


@dataclass
class TrainStats:
    steps: int
    batch_size: int
    wall_s: float
    peak_memory_mb: float
    final_loss: float | None
    resumed_from: int = 0

    def as_dict(self) -> dict:
        return {
            "optimizer_steps": self.steps,
            "batch_size": self.batch_size,
            "images_seen": self.steps * self.batch_size,
            "wall_s": round(self.wall_s, 3),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "final_loss": self.final_loss,
            "resumed_from_step": self.resumed_from,
        }


class EMA:
    """Exponential moving average of the trainable tensors, with the usual warm-up
    (decay = min(decay, (1 + n) / (10 + n))) so short budgets are not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, param in model.named_parameters():
            if key in self.shadow:
                self.shadow[key].lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for key, value in self.shadow.items():
            params[key].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates, self.shadow = state["decay"], state["updates"], state["shadow"]


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast of the forward passes (fp32: none); optimizer state and EMA stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_checkpoint(path: Path, device: torch.device | str, mmap: bool = False) -> tuple[dict, str | None]:
    """(state, None) of a training checkpoint, or ({}, the one-line reason it cannot be resumed from)."""
    try:
        state = torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - pickle, zip and torch raise many kinds
        return {}, (f"--resume: checkpoint {path} is unreadable (truncated or not a checkpoint: "
                    f"{first_line(error)}); delete it and run without --resume")
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        return {}, (f"--resume: {path} is not a training checkpoint (no {', '.join(missing)}); "
                    "delete it and run without --resume")
    return state, None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (None: it can, or there is none to judge): checked before a
    resumed run loads data or writes anything. Memory-mapped, so the weights themselves are not read."""
    if not path.is_file():
        return None
    return _read_checkpoint(path, "cpu", mmap=True)[1]


class Trainer:
    """Train ``model`` for ``ctx.total_steps`` optimizer steps with ``method``'s hooks."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        ctx: MethodContext,
        lr: float,
        ema_decay: float = 0.0,
        grad_clip: float = 1.0,
        precision: str = "fp32",
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 500,
        resume: bool = False,
        checkpoint_every_s: float = 0.0,
        description: str = "train",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        self.model, self.method, self.ctx = model, method, ctx
        self.grad_clip, self.precision = grad_clip, precision
        # channels_last lets cuDNN pick NHWC kernels (tensor cores under bf16/fp16); the input batches follow
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # the method's loss sees the compiled module (DDP-wrapped on several processes, which averages the
        # gradients in backward); hooks, masks, EMA and checkpoints use the original
        wrapped = ctx.distributed.wrap_model(model)
        self.forward_model = torch.compile(wrapped) if compile else wrapped
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
        self.checkpoint_every = checkpoint_every
        # steps or seconds, whichever comes first: a short run with slow steps still checkpoints (0: steps only)
        self.checkpoint_every_s = checkpoint_every_s
        self.resume = resume
        self.description = description
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        ctx.optimizer = self.optimizer
        self.ema = EMA(model, ema_decay) if ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler(enabled=precision == "fp16" and ctx.device.type == "cuda")
        self.wall_before_s = 0.0  # training seconds spent before the checkpoint a resume starts from
        self._started = time.perf_counter()

    def elapsed_s(self) -> float:
        """Training wall time so far, the part before an interrupt included (what the record reports)."""
        return self.wall_before_s + time.perf_counter() - self._started

    def save_checkpoint(self, step: int) -> None:
        if self.checkpoint_path is None or not self.ctx.distributed.is_main:  # all ranks hold one state
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "method": self.method.state_dict(),
            "generator": self.ctx.generator.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "wall_s": self.elapsed_s(),
        }
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self) -> int:
        """Restore the checkpoint's state; a truncated file, or one another run or model wrote, is a
        one-line :class:`BenchError` naming it (resuming from it would train something else)."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            raise BenchError(f"--resume: no checkpoint at {path}; run once without --resume")
        state, problem = _read_checkpoint(path, self.ctx.device)
        if problem is not None:
            raise BenchError(problem)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema and state["ema"]:
                self.ema.load_state_dict(state["ema"])
            if state.get("method"):
                self.method.load_state_dict(state["method"])
            self.ctx.generator.set_state(state["generator"])
            torch.set_rng_state(state["cpu_rng"])
            step = int(state["step"])
            self.wall_before_s = float(state.get("wall_s", 0.0))  # checkpoints written before it was kept: 0
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise BenchError(f"--resume: checkpoint {path} belongs to another model or method "
                             f"({first_line(error)}); delete it and run without --resume") from None
        if not 0 <= step <= self.ctx.total_steps:
            raise BenchError(f"--resume: checkpoint {path} is at step {step}, outside this run's "
                             f"0..{self.ctx.total_steps}; delete it and run without --resume")
        return step

    def _checkpoint_due(self, done: int, last_checkpoint: float) -> bool:
        """After ``done`` steps: every ``checkpoint_every`` steps, or ``checkpoint_every_s`` after the last one."""
        if done % self.checkpoint_every == 0:
            return True
        return self.checkpoint_every_s > 0 and clock() - last_checkpoint >= self.checkpoint_every_s

    def train(self) -> TrainStats:
        total = self.ctx.total_steps
        start_step = self.load_checkpoint() if self.resume else 0
        # skip the batches already consumed so a resumed run sees the same data order
        for _ in range(start_step):
            self.ctx.next_batch()
        self.model.train()
        self._started = time.perf_counter()
        last_checkpoint = clock()
        bar = progress_bar(range(start_step, total), desc=self.description, initial=start_step, total=total,
                           leave=False, dynamic_ncols=True, unit="step",
                           disable=total == 0 or not self.ctx.distributed.is_main)  # one bar per run
        with _InterruptFlag() as interrupt:
            loss_value = self._loop(bar, total, last_checkpoint, interrupt)
        bar.close()
        if self.ema:
            self.ema.copy_to(self.model)
        self.model.eval()
        return TrainStats(
            steps=total,
            batch_size=self.ctx.batch_size,
            wall_s=self.elapsed_s(),
            peak_memory_mb=peak_memory_mb(self.ctx.device),
            final_loss=loss_value,
            resumed_from=start_step,
        )

    def _loop(self, bar, total: int, last_checkpoint: float, interrupt: _InterruptFlag) -> float | None:
        """The optimizer steps; a Ctrl-C stops after the step in progress, with a checkpoint of it."""
        loss_value: float | None = None
        for step in bar:
            yield_point()  # a pending latency measurement of another run gets the machine for itself
            x0 = self.ctx.distributed.local_shard(self.ctx.next_batch())  # this rank's share of the batch
            x0 = x0.contiguous(memory_format=self.memory_format)
            with autocast(self.ctx.device, self.precision), self.ctx.distributed.sharded_step():
                loss = self.method.compute_loss(self.forward_model, x0, self.ctx)
            loss_value = self.ctx.distributed.mean(loss.detach())  # the global loss, the same on every rank
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss became {loss_value} at step {step}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.method.on_after_backward(step, self.model, self.ctx)
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.method.on_after_optimizer_step(step, self.model, self.ctx)
            if self.ema:
                self.ema.update(self.model)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=step % 50 == 0)  # log lines show the latest
            if interrupt.raised:
                bar.close()
                self.save_checkpoint(step + 1)
                raise TrainingInterrupted(self.checkpoint_path, step + 1, total)
            if self.checkpoint_path and step + 1 < total and self._checkpoint_due(step + 1, last_checkpoint):
                self.save_checkpoint(step + 1)
                last_checkpoint = clock()
        return loss_value
