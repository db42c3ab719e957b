"""Method and dataset registries.

Methods are found by name, like timm models: ``@register_method("rigl")`` on a class in
``diffprune_bench/methods/<name>.py`` or in a third-party package that
declares an entry point in the group ``diffprune_bench.methods``. Discovery imports those modules so
their decorators run; nothing else has to be edited to add a method.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from diffprune_bench.errors import BenchError

if TYPE_CHECKING:
    from diffprune_bench.context import MethodContext

ENTRY_POINT_GROUP = "diffprune_bench.methods"
BUNDLED_METHODS = "diffprune_bench.methods"
FAMILIES = ("dense", "structured", "unstructured", "n:m", "step-aware")
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

    def module_for_step(self, step_index: int) -> nn.Module:
        if self.step_modules is None:
            return self.model
        return self.step_modules[step_index]


class Method:
    """Base class of every compression method (the contract of DESIGN.md section 4).

    Subclasses set ``family``, ``init``, ``Params`` (a dataclass whose defaults come from the paper)
    and ``description``; they override :meth:`prepare` and :meth:`export` and, optionally, the
    training hooks. Methods never count MACs, score FID or write files: the harness does that the same
    way for all of them.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "dense"
    init: ClassVar[str] = "pretrained"
    description: ClassVar[str] = ""
    #: Label for listings and the leaderboard when it must say more than the name (e.g. that the method
    #: is our reading of a paper); "" shows the name.
    display_name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    #: True for the baseline row: the harness evaluates the cached dense base itself.
    is_baseline: ClassVar[bool] = False
    #: Training steps: "" follows ``init`` (pretrained -> finetune_steps, scratch -> base_steps);
    #: "finetune" trains a scratch method for finetune_steps (Diff-Pruning's scratch-training row).
    budget: ClassVar[str] = ""

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Prune, attach masks or make slimmable; returns the model the trainer will train."""
        return model

    def compute_loss(self, model: nn.Module, x0, ctx: MethodContext):
        """Training loss of one batch; override for distillation or multi-width (sandwich) training."""
        return ctx.loss_fn(model, x0)

    def on_after_backward(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        """Called after ``loss.backward()`` and before gradient clipping / the optimizer step."""

    def on_after_optimizer_step(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        """Called after every optimizer step (e.g. to re-apply masks or update them)."""

    def export(self, model: nn.Module, ctx: MethodContext) -> Deployable | list[Deployable]:
        """Turn the trained model into what is evaluated; a list gives one record per variant."""
        return Deployable(model=model)


_METHODS: dict[str, type[Method]] = {}
_DISCOVERED = False


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``cls`` available as ``name`` to the harness and the CLI."""

    def decorator(cls: type[Method]) -> type[Method]:
        if cls.family not in FAMILIES:
            raise ValueError(f"method {name!r}: family {cls.family!r} is not one of {', '.join(FAMILIES)}")
        if cls.init not in INITS:
            raise ValueError(f"method {name!r}: init {cls.init!r} is not one of {', '.join(INITS)}")
        if not dataclasses.is_dataclass(cls.Params):
            raise ValueError(f"method {name!r}: Params must be a dataclass")
        existing = _METHODS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is already registered by {existing.__module__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


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


def method_names() -> list[str]:
    discover_methods()
    return sorted(_METHODS)


def get_method_class(name: str) -> type[Method]:
    discover_methods()
    if name not in _METHODS:
        raise BenchError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


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
    return method_cls.Params(**overrides)


def create_method(name: str, overrides: dict[str, Any] | None = None) -> Method:
    cls = get_method_class(name)
    return cls(build_params(cls, overrides))
