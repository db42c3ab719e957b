"""Run configuration: one dataclass, loadable from YAML, validated with one-line errors.

Every CLI option of ``diffbench run`` is a field here, so a YAML file given with ``--config`` can set
any of them; the CLI overrides the file. Validation happens once, here, so the rest of the harness can
trust the values.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffprune_bench.errors import BenchError


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names one key twice: YAML keeps the last silently, so one of two settings would vanish."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(None, None, f"duplicate key {key!r} on line {line} (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line

    def __str__(self) -> str:
        return self.problem or ""


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers (so N:M patterns like ``2:4`` stay strings) and
    with floats like ``2e-4`` (YAML 1.1 wants a dot) read as numbers, as users write learning rates, and
    refusing a key given twice in one mapping (:class:`DuplicateKeyError`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults`` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _key, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, regexp) for tag, regexp in _resolvers if tag != "tag:yaml.org,2002:float"]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """Parse YAML with the project's loader (use it for every config, suite and parameter value)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**63 - 1
#: a run id is one folder name under --results-dir: no separators, no "..", nothing a shell would mangle
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._+-]+")


def check_run_id(run_id: str | None) -> None:
    """Refuse a run id that would leave ``--results-dir`` (``../x``, ``/abs``, ``a/b``) or is not a plain name."""
    if run_id is None:
        return
    if not RUN_ID_PATTERN.fullmatch(run_id) or run_id in (".", ".."):
        raise BenchError(f"run-id {run_id!r} must be one folder name of letters, digits and '._+-' "
                         "(no path separators, not '.' or '..', not empty)")


def check_target_given(method_cls: type, sparsity: float) -> None:
    """A method that compresses to a target must be given one: run at sparsity 0 it would land on the
    leaderboard as a row that compresses nothing. Controls and sampler-level methods (whose target may
    come from their parameters, checked by their own ``validate``) are exempt."""
    if method_cls.takes_sparsity and not method_cls.is_baseline and not method_cls.sampler_level \
            and float(sparsity) == 0.0:
        raise BenchError(f"method {method_cls.name!r} needs a target: give --sparsity S with S in (0, 1)")
SPACINGS = ("leading", "trailing", "linspace", "quad")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RunConfig:
    """Everything that defines one run; recorded verbatim in ``config.yaml`` beside the record."""

    method: str = "dense"
    dataset: str = "digits"
    sparsity: float = 0.0
    seed: int = 0
    preset: str | None = None  # None: the dataset's default preset
    base: str | None = None  # pretrained checkpoint (local dir or hub id); None: train and cache one
    device: str = "auto"
    data_root: str | None = None
    download: bool = False
    resolution: int | None = None  # image size of celeba / imagefolder (None: the dataset's default)
    num_workers: int | None = None  # data loader processes (None: automatic, see data.default_num_workers)
    # CPU intra-op threads of the run (None: the dataset's default, else torch's). A CPU's float reductions
    # depend on the thread count, so a cell reproduces bit-for-bit only at the same count: digits fixes 1,
    # which is also what a sweep's single-thread workers use, so a hand-run cell equals its sweep cell.
    threads: int | None = None
    # training budgets: the base gets base_steps, pretrained methods finetune_steps, scratch methods
    # scratch_steps (None: base_steps; their control is a dense model trained from scratch as long)
    base_steps: int | None = None
    finetune_steps: int | None = None
    scratch_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    ema_decay: float | None = None
    grad_clip: float = 1.0
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    # sampling and evaluation protocol
    sample_steps: int | None = None
    timestep_spacing: str = "leading"
    num_samples: int | None = None
    fid_extractor: str | None = None
    inception_weights: str | None = None
    latency_repeats: int = 10
    latency_batch: int = 16
    # bookkeeping
    results_dir: str = "results/runs"
    cache_dir: str = ".diffbench-cache"
    run_id: str | None = None
    resume: bool = False
    # a run id naming a finished (ok) run is refused unless this is set: results are never lost by accident
    replace_existing: bool = False
    checkpoint_every: int = 500  # optimizer steps between training checkpoints
    checkpoint_every_s: float = 60.0  # and at most this many seconds between them (0: steps only)
    suite: str | None = None  # name of the suite a sweep ran this cell for (recorded; None for single runs)
    # set by a sweep for cells whose training another cell repeats: store / reuse it (see trained_cache)
    share_training: bool = False
    method_params: dict[str, Any] = field(default_factory=dict)
    # composition: a sampler-level method (fewer steps, feature caching) applied to the trained method's model
    then: str | None = None
    then_params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> RunConfig:
        """Raise :class:`BenchError` naming the first bad value and what is allowed."""
        from diffprune_bench.data import dataset_names
        from diffprune_bench.models import preset_names
        from diffprune_bench.registry import create_method, get_method_class

        self._check_types()
        get_method_class(self.method)
        if self.dataset not in dataset_names():
            raise BenchError(f"unknown dataset {self.dataset!r}; available: {', '.join(dataset_names())}")
        if self.preset is not None and self.preset not in preset_names():
            raise BenchError(f"unknown preset {self.preset!r}; available: {', '.join(preset_names())}")
        if self.device not in DEVICES:
            raise BenchError(f"unknown device {self.device!r}; allowed: {', '.join(DEVICES)}")
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise BenchError(f"sparsity {self.sparsity!r} is outside [0, 1)")
        for name in ("base_steps", "finetune_steps", "scratch_steps", "sample_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise BenchError(f"{name.replace('_', '-')} {value!r} must be a non-negative integer")
        for name in ("batch_size", "num_samples", "latency_repeats", "latency_batch", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise BenchError(f"{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise BenchError(f"resolution {self.resolution!r} must be an integer of at least 8")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise BenchError(f"threads {self.threads!r} must be a positive integer")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise BenchError(f"num-workers {self.num_workers!r} must be a non-negative integer")
        if not 0 <= self.seed <= MAX_SEED:  # torch.manual_seed and numpy take at most a signed 64-bit seed
            raise BenchError(f"seed {self.seed!r} must be an integer in [0, {MAX_SEED}] (2**63 - 1)")
        if self.num_samples is not None and self.num_samples < 2:
            raise BenchError(f"num-samples {self.num_samples!r} is too few: FID's covariance needs at least 2 "
                             "samples (the protocol's defaults use 1000 or more)")
        check_run_id(self.run_id)
        if not self.checkpoint_every_s >= 0:
            raise BenchError(f"checkpoint-every-s {self.checkpoint_every_s!r} must be a non-negative number of seconds")
        if self.sample_steps == 0:
            raise BenchError("sample-steps 0 must be a positive integer")
        if self.lr is not None and not self.lr > 0:
            raise BenchError(f"lr {self.lr!r} must be positive")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise BenchError(f"ema-decay {self.ema_decay!r} is outside [0, 1)")
        if self.timestep_spacing not in SPACINGS:
            raise BenchError(f"unknown timestep spacing {self.timestep_spacing!r}; allowed: {', '.join(SPACINGS)}")
        if self.precision not in PRECISIONS:
            raise BenchError(f"unknown precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.fid_extractor is not None:
            from diffprune_bench.metrics.fid import extractor_names

            if self.fid_extractor not in extractor_names():
                raise BenchError(
                    f"unknown FID extractor {self.fid_extractor!r}; available: {', '.join(extractor_names())}"
                )
        if self.base and self.base != "train":  # shipped_bases.TRAIN_KEYWORD: train and cache one
            from diffprune_bench.models import check_local_base

            check_local_base(self.base)
        if not isinstance(self.method_params, dict):
            raise BenchError(f"method_params {self.method_params!r} must be a mapping")
        create_method(self.method, self.method_params, sparsity=self.sparsity)  # every method check, before any work
        self._validate_then()
        check_target_given(get_method_class(self.method), self.sparsity)
        return self

    def _validate_then(self) -> None:
        """``then`` must name a sampler-level method, and ``then_params`` be its parameters."""
        from diffprune_bench.registry import create_method, get_method_class, method_names

        if not isinstance(self.then_params, dict):
            raise BenchError(f"then_params {self.then_params!r} must be a mapping")
        if self.then is None:
            if self.then_params:
                raise BenchError("then-param given without --then (the sampler-level method they belong to)")
            return
        sampler_level = [n for n in method_names() if get_method_class(n).sampler_level]
        if self.then not in sampler_level:
            raise BenchError(f"--then {self.then!r} is not a sampler-level method; allowed: {', '.join(sampler_level)}")
        if get_method_class(self.method).sampler_level:
            raise BenchError(f"--then follows a trained method, not the sampler-level {self.method!r}")
        try:  # the sampler method's own checks (ranges, a target), before any model is built
            create_method(self.then, self.then_params, sparsity=0.0)  # its target comes from then_params
        except TypeError as error:
            raise BenchError(f"then-param: {error}") from None

    def _check_types(self) -> None:
        """Every field has the type its annotation says (YAML ``lr: abc`` must not reach arithmetic)."""
        hints = typing.get_type_hints(RunConfig)
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            allowed = _allowed_types(hints[item.name])
            if value is None and type(None) in allowed:
                continue
            wanted = [t for t in allowed if t is not type(None)]
            if float in wanted:
                wanted.append(int)  # 1 is a fine learning rate
            if isinstance(value, bool) and bool not in wanted or not isinstance(value, tuple(wanted)):
                names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in allowed if t is not int or
                                    float not in allowed)
                raise BenchError(f"{item.name.replace('_', '-')} {value!r} must be {names}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a mapping", type(None): "null"}


def _allowed_types(hint: Any) -> tuple[type, ...]:
    """``float | None`` -> (float, NoneType); ``dict[str, Any]`` -> (dict,)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    return tuple(typing.get_origin(a) or a for a in args)


#: Options a resumed run may change: where files go, how fast or how often things happen, never what
#: the run trains or measures (``latency_repeats`` only sets how many timings the median takes).
RESUME_HARMLESS = (
    "results_dir",
    "cache_dir",
    "data_root",
    "download",
    "num_workers",
    "device",
    "inception_weights",
    "checkpoint_every",
    "checkpoint_every_s",
    "latency_repeats",
    "share_training",
    "replace_existing",
    "resume",
    "run_id",
)


def resume_refusal(saved_config: Path, cfg: RunConfig) -> str | None:
    """Why ``cfg`` may not resume the run whose ``config.yaml`` is ``saved_config`` (None: it may).

    A resume continues the same run: any other difference would mix two configurations in one
    record (and used to overwrite config.yaml silently). No saved config: nothing to compare. A checkpoint
    that is truncated or not a training checkpoint is refused too, before anything is loaded or written."""
    from diffprune_bench.trainer import CHECKPOINT_NAME, checkpoint_problem

    return _config_refusal(saved_config, cfg) or checkpoint_problem(saved_config.parent / "checkpoint" /
                                                                    CHECKPOINT_NAME)


def _config_refusal(saved_config: Path, cfg: RunConfig) -> str | None:
    """How ``cfg`` differs from the saved config of the run it resumes (None: only harmlessly)."""
    if not saved_config.is_file():
        return None
    try:
        saved = yaml_load(saved_config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        return f"--resume: cannot read {str(saved_config)!r} ({type(error).__name__}); start a new run"
    if not isinstance(saved, dict):
        return f"--resume: {str(saved_config)!r} is not a config mapping; start a new run"
    defaults = RunConfig().to_dict()
    current = cfg.to_dict()
    differing = [key for key in current if key not in RESUME_HARMLESS
                 and saved.get(key, defaults[key]) != current[key]]
    if not differing:
        return None
    details = ", ".join(f"{k} ({saved.get(k, defaults[k])!r} -> {current[k]!r})" for k in differing)
    return (f"--resume refused: the config differs from the run's {str(saved_config)!r} in {details}; "
            f"resume with the same options (only {', '.join(RESUME_HARMLESS[:-2])} may change) or start a new run")


def parse_checkpoint_every(text: str) -> dict[str, Any]:
    """``--checkpoint-every``: ``500`` -> every 500 steps; ``90s``, ``5m``, ``1h`` -> every so many seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", str(text))
    if match is None or float(match.group(1)) <= 0 or (match.group(2) is None and "." in match.group(1)):
        raise BenchError(f"--checkpoint-every {text!r} must be a positive number of steps (500) "
                         "or a duration (90s, 5m, 1h)")
    number, unit = match.groups()
    if unit is None:
        return {"checkpoint_every": int(number)}
    return {"checkpoint_every_s": float(number) * {"s": 1, "m": 60, "min": 60, "h": 3600}[unit]}


def config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RunConfig)}


def read_yaml_file(path: str | Path, what: str) -> Any:
    """Parse the YAML file ``path`` (a ``what``: "config file", "suite file"), every problem a one-line
    :class:`BenchError` naming the file: missing, a folder, unreadable, not UTF-8, bad syntax, a key twice."""
    path = Path(path)
    if path.is_dir():
        raise BenchError(f"{what} {str(path)!r} is a folder; give the YAML file itself")
    if not path.is_file():
        raise BenchError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BenchError(f"{what} {str(path)!r} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise BenchError(f"cannot read {what} {str(path)!r} ({error.strerror or type(error).__name__})") from None
    try:
        return yaml_load(text)
    except DuplicateKeyError as error:
        raise BenchError(f"{what} {str(path)!r}: {error}; give each key once") from None
    except yaml.YAMLError as error:
        raise BenchError(f"{what} {str(path)!r} is not valid YAML: {error}".splitlines()[0]) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad syntax."""
    data = read_yaml_file(path, "config file") or {}
    if not isinstance(data, dict):
        raise BenchError(f"config file {str(path)!r} must hold a mapping of option: value")
    return data


def make_config(values: dict[str, Any]) -> RunConfig:
    """Build a validated :class:`RunConfig` from a mapping (YAML, CLI or suite), normalising keys."""
    normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(normalised) - config_fields())
    if unknown:
        raise BenchError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(config_fields()))}")
    try:
        config = RunConfig(**normalised)
    except TypeError as error:
        raise BenchError(str(error)) from None
    if isinstance(config.sparsity, int):
        config.sparsity = float(config.sparsity)
    return config.validate()


def parse_param_overrides(items: list[str]) -> dict[str, Any]:
    """``["drop_fraction=0.05", "stages=[4:4, 2:4]"]`` -> dict, values parsed as YAML scalars/lists."""
    result: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise BenchError(f"method parameter {item!r} must look like name=value")
        key, raw = item.split("=", 1)
        try:
            result[key.strip().replace("-", "_")] = yaml_load(raw)
        except yaml.YAMLError:
            raise BenchError(f"method parameter {item!r}: {raw!r} is not a valid value (a number, a word, "
                             "or a YAML list like [1, 2])") from None
    return result
