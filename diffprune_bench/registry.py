"""Registries (one generic :class:`Registry`) and the method contract (:class:`Method`).

Methods are found by name, like timm models: ``@register_method("rigl")`` on a class in
``diffprune_bench/methods/<name>.py`` or in a third-party package that
declares an entry point in the group ``diffprune_bench.methods``. Discovery imports those modules so
their decorators run; nothing else has to be edited to add a method. Datasets, UNet presets and FID
extractors live in the same kind of :class:`Registry`, so a test can swap any entry in and out with
``Registry.temporary``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from diffprune_bench.errors import BenchError
from diffprune_bench.typecheck import field_type_problem

if TYPE_CHECKING:
    from diffprune_bench.context import MethodContext

T = TypeVar("T")


class Registry(dict[str, T]):
    """Name -> entry (a method class, a dataset spec, a preset config, an extractor factory).

    A plain ``dict`` underneath, so lookups read as usual; :meth:`lookup` adds the one-line error that
    names the bad value and what is allowed, and :meth:`temporary` adds an entry for the length of a
    ``with`` block (tests register a toy method or dataset without leaking it into other tests).
    """

    def __init__(self, kind: str, on_lookup: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.kind = kind
        self._on_lookup = on_lookup  # e.g. method discovery: run before names are listed or looked up

    def _ready(self) -> None:
        if self._on_lookup is not None:
            self._on_lookup()

    def names(self) -> list[str]:
        self._ready()
        return sorted(self)

    def lookup(self, name: str) -> T:
        self._ready()
        if name not in self:
            raise BenchError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self))}")
        return self[name]

    @contextmanager
    def temporary(self, name: str, entry: T) -> Iterator[T]:
        """``entry`` registered as ``name`` inside the block; whatever was there before comes back after."""
        self._ready()
        missing = object()
        previous = self.get(name, missing)
        self[name] = entry
        try:
            yield entry
        finally:
            if previous is missing:
                self.pop(name, None)
            else:
                self[name] = previous


ENTRY_POINT_GROUP = "diffprune_bench.methods"
BUNDLED_METHODS = "diffprune_bench.methods"
FAMILIES = ("dense", "structured", "unstructured", "n:m", "step-aware", "training-free")
INITS = ("pretrained", "scratch")


@dataclass
class NoParams:
    """Hyperparameters of a method that has none."""


@dataclass
class Deployable:
    """What a method hands to the evaluator.

    ``model`` is the compressed network (masks applied, pruned graph). Step-aware methods also give
    ``step_modules``: the module to run at each sampling step (len == sampling steps). ``label`` tells
    variants apart when one training run yields several (e.g. SparseDM's inference N:M patterns);
    ``info`` is method-specific facts copied into the record (channel ratio, per-layer densities...).
    """

    model: nn.Module
    step_modules: list[nn.Module] | None = None
    label: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    sparsity: float | None = None
    #: DDIM steps this deployable samples with (None: the run's ``sample_steps``). Trajectory MACs and
    #: latency follow it, while the protocol (and ``macs_reduction``'s denominator) keeps the run's steps,
    #: so a 25-step row of a 50-step table shows 50 % saved. ``step_modules``, if given, has this length.
    sample_steps: int | None = None
    #: what the run's ``model/`` folder exports when ``model`` alone would not reproduce the samples (a
    #: step-aware schedule folded into one module diffusers can call); None: ``model``
    export_model: nn.Module | None = None

    def exportable(self) -> nn.Module:
        """The module the harness exports as the run's diffusers pipeline."""
        return self.model if self.export_model is None else self.export_model

    def module_for_step(self, step_index: int) -> nn.Module:
        if self.step_modules is None:
            return self.model
        return self.step_modules[step_index]


class Method:
    """Base class of every compression method (the contract of DESIGN.md section 4).

    Subclasses set ``family``, ``init``, ``Params`` (a dataclass whose defaults come from the paper)
    and ``description``; they override :meth:`prepare` and :meth:`export` and, optionally,
    :meth:`validate`, :meth:`compute_loss`, the training hooks and :meth:`state_dict` /
    :meth:`load_state_dict`. The harness calls them in this order: ``validate`` (from
    :func:`create_method`, before any data is loaded or any model trained), ``prepare``, the trainer's
    loop (``compute_loss``, ``on_after_backward``, ``on_after_optimizer_step``), ``export``.

    Obligations, which the harness relies on and cannot check for you:

    * **Compression shows in the exported weights**: pruned weights are zeros, or the exported model
      has smaller shapes. MACs, non-zero parameters and latency are measured from what ``export``
      returns, never from what the method says about itself.
    * **Decide on rank 0, then broadcast**: on several processes every rank runs the hooks; any random
      or data-dependent decision (masks, channels, schedules) is taken on ``ctx.distributed`` rank 0
      and broadcast (``ctx.distributed.broadcast_``), so every rank trains the same network.
    * **The trainer evaluates an EMA copy**: with EMA on, the weights that reach ``export`` are the
      averaged ones, which drift off the mask; ``export`` re-applies masks (and N:M patterns) itself.
    * **No mask buffers in the saved model**: ``export`` bakes masks into the weights and removes
      the buffers and hooks it attached, so the model saves and loads as a plain diffusers UNet (or
      the pruned UNet class for smaller shapes).
    * **Never measure or write**: methods never count MACs for the record, compute FID, or write
      files; the harness does that the same way for every method (``ctx.count_macs`` and
      ``ctx.score_fid`` exist for methods whose *search* needs them).
    * **Resumable state**: anything a method changes while training (masks, step counters, schedules)
      is returned by :meth:`state_dict` and restored by :meth:`load_state_dict`, or a resumed run
      differs from an uninterrupted one.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "dense"
    init: ClassVar[str] = "pretrained"
    description: ClassVar[str] = ""
    #: Label for listings and the leaderboard when it must say more than the name (e.g. that the method
    #: is our reading of a paper); "" shows the name.
    display_name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    #: True for the baseline row: the harness evaluates the cached dense base itself (no training).
    is_baseline: ClassVar[bool] = False
    #: False for reference rows that compress nothing (the dense controls): the suite runs them once per
    #: dataset x seed at sparsity 0, the leaderboard shows them beside every sparsity, and a run that
    #: asks for a non-zero sparsity is refused before any work.
    takes_sparsity: ClassVar[bool] = True
    #: Training steps: "" follows ``init`` (pretrained -> finetune_steps, scratch -> base_steps);
    #: "finetune" trains a scratch method for finetune_steps (Diff-Pruning's scratch-training row).
    budget: ClassVar[str] = ""
    #: True for training-free, sampler-level methods (fewer steps, feature caching): they never train and
    #: turn a Deployable into a faster one with :meth:`accelerate`, alone or after a trained method
    #: (``--then``).
    sampler_level: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    def validate(self, sparsity: float | None) -> None:
        """Check ``self.params`` (and, when given, the run's target ``sparsity``) before any work.

        Raise :class:`BenchError` with one line naming the bad value and what is allowed. This is the one
        place for parameter checks: :func:`create_method` calls it for ``diffbench run``, for every cell
        of a suite before the first one runs, and again in the harness. ``sparsity`` is None where the
        cell is not known yet (a suite's ``method_params`` alone)."""

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Prune, attach masks or make slimmable; returns the model the trainer will train."""
        return model

    def compute_loss(self, model: nn.Module, x0: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        """Training loss of one batch; override for distillation or multi-width (sandwich) training."""
        return ctx.loss_fn(model, x0)

    def on_after_backward(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        """Called after ``loss.backward()`` and before gradient clipping / the optimizer step."""

    def on_after_optimizer_step(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        """Called after every optimizer step (e.g. to re-apply masks or update them)."""

    def export(self, model: nn.Module, ctx: MethodContext) -> Deployable | list[Deployable]:
        """Turn the trained model into what is evaluated; a list gives one record per variant."""
        return Deployable(model=model)

    def accelerate(self, deployable: Deployable, ctx: MethodContext) -> Deployable:
        """Sampler-level methods only: the same model sampled more cheaply (``ctx.sparsity`` = target saving)."""
        raise BenchError(f"method {self.name!r} is not sampler-level: it cannot follow another method (--then)")

    def state_dict(self) -> dict[str, Any]:
        """What a training checkpoint keeps of this method (see the resumable-state obligation)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, when a run resumes from its checkpoint."""


def discover_methods(force: bool = False) -> None:
    """Import the bundled ``diffprune_bench/methods/`` modules and every entry-point plug-in, once."""
    global _DISCOVERED
    if _DISCOVERED and not force:
        return
    bundled = importlib.import_module(BUNDLED_METHODS)  # by name: the core never imports a method

    for module in pkgutil.iter_modules(bundled.__path__):
        importlib.import_module(f"{bundled.__name__}.{module.name}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
    _DISCOVERED = True


METHODS: Registry[type[Method]] = Registry("method", on_lookup=discover_methods)
_DISCOVERED = False


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``cls`` available as ``name`` to the harness and the CLI."""

    def decorator(cls: type[Method]) -> type[Method]:
        check_method_class(name, cls)
        existing = METHODS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is already registered by {existing.__module__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def check_method_class(name: str, cls: type[Method]) -> None:
    """The class attributes every method must get right (checked when it registers)."""
    if cls.family not in FAMILIES:
        raise ValueError(f"method {name!r}: family {cls.family!r} is not one of {', '.join(FAMILIES)}")
    if cls.init not in INITS:
        raise ValueError(f"method {name!r}: init {cls.init!r} is not one of {', '.join(INITS)}")
    if not dataclasses.is_dataclass(cls.Params):
        raise ValueError(f"method {name!r}: Params must be a dataclass")


def method_names() -> list[str]:
    return METHODS.names()


def get_method_class(name: str) -> type[Method]:
    return METHODS.lookup(name)


def build_params(method_cls: type[Method], overrides: dict[str, Any] | None) -> Any:
    """Params dataclass of ``method_cls`` with ``overrides`` applied, rejecting unknown keys."""
    overrides = dict(overrides or {})
    allowed = {f.name for f in dataclasses.fields(method_cls.Params)}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise BenchError(
            f"unknown parameter(s) {', '.join(unknown)} for method {method_cls.name!r}; "
            f"allowed: {', '.join(sorted(allowed)) or '(none)'}"
        )
    problem = field_type_problem(method_cls.Params, overrides)
    if problem is not None:
        raise BenchError(f"method {method_cls.name!r}: parameter {problem}")
    try:
        return method_cls.Params(**overrides)
    except (TypeError, ValueError) as error:  # the dataclass (or its __post_init__) rejected a value
        raise BenchError(f"method {method_cls.name!r}: bad parameter value ({error})".splitlines()[0]) from None




def check_sparsity(method_cls: type[Method], sparsity: float | None) -> None:
    """A reference row (``takes_sparsity = False``) runs at sparsity 0 only."""
    if sparsity is not None and not method_cls.takes_sparsity and float(sparsity) != 0.0:
        raise BenchError(
            f"method {method_cls.name!r} compresses nothing and runs at sparsity 0 only, not {sparsity:g} "
            "(the leaderboard shows it beside every sparsity)"
        )


def create_method(name: str, overrides: dict[str, Any] | None = None, sparsity: float | None = None) -> Method:
    """The method ``name`` with its parameters, validated (:meth:`Method.validate`) before any work."""
    cls = get_method_class(name)
    check_sparsity(cls, sparsity)
    method = cls(build_params(cls, overrides))
    try:
        method.validate(sparsity)
    except (TypeError, ValueError) as error:  # a comparison on a value of the wrong type, say
        raise BenchError(f"method {name!r}: bad parameter value ({error})".splitlines()[0]) from None
    return method
