"""The ``diffbench`` command line (typer).

Usage errors (bad values, unknown names, missing files) print one line and exit with code 2; a run
that fails after it started prints one line, leaves a failed record, and exits with code 1.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from .errors import BenchError

warnings.filterwarnings("ignore", category=FutureWarning)

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Benchmark compression methods for diffusion models."
)


def fail_usage(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn BenchError into a one-line message with exit code 2 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BenchError as error:
            fail_usage(str(error))

    return wrapper


def _cli_values(**options: Any) -> dict[str, Any]:
    """The options the user actually typed (None means: not given, keep the YAML/default value)."""
    return {k: v for k, v in options.items() if v is not None}


@app.command()
@friendly_errors
def run(
    method: str = typer.Option(None, "--method", "-m", help="Method name (see `diffbench methods`)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Dataset name (see `diffbench datasets`)."),
    sparsity: float = typer.Option(None, help="Target sparsity in [0, 1): MACs removed (structured) or weights."),
    seed: int = typer.Option(None, help="Seed of the base, training and evaluation noise."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML file with any of these options."),
    preset: str = typer.Option(None, help="UNet preset (default: the dataset's)."),
    base: str = typer.Option(None, help="Pretrained base: save_pretrained folder or hub id."),
    device: str = typer.Option(None, help="auto | cpu | cuda"),
    data_root: str = typer.Option(None, envvar="DIFFBENCH_DATA", help="Folder holding real datasets."),
    download: bool = typer.Option(None, "--download/--no-download", help="Download missing data when online."),
    base_steps: int = typer.Option(None, help="Training steps of the dense base and of scratch methods."),
    finetune_steps: int = typer.Option(None, help="Fine-tuning steps of pretrained methods."),
    batch_size: int = typer.Option(None, help="Training batch size."),
    lr: float = typer.Option(None, help="AdamW learning rate."),
    ema_decay: float = typer.Option(None, help="EMA decay (0 disables)."),
    precision: str = typer.Option(None, help="fp32 | bf16 | fp16 (autocast)."),
    sample_steps: int = typer.Option(None, help="DDIM sampling steps."),
    timestep_spacing: str = typer.Option(None, help="leading | trailing | linspace | quad"),
    num_samples: int = typer.Option(None, help="Generated samples for FID/KID."),
    fid_extractor: str = typer.Option(None, help="digits-net | inception-v3"),
    inception_weights: str = typer.Option(None, envvar="DIFFBENCH_INCEPTION_WEIGHTS", help="Inception .pt file."),
    latency_repeats: int = typer.Option(None, help="Timed sampling trajectories (median reported)."),
    latency_batch: int = typer.Option(None, help="Batch size of the latency measurement."),
    results_dir: str = typer.Option(None, help="Where run folders are written."),
    cache_dir: str = typer.Option(None, help="Cache of base models, extractors and reference statistics."),
    run_id: str = typer.Option(None, help="Run id (default: time, dataset, method, sparsity, seed)."),
    resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from the run's checkpoint."),
    param: list[str] = typer.Option(None, "--param", "-p", help="Method parameter name=value (repeatable)."),
) -> None:
    """Run one method on one dataset at one sparsity and write its record(s)."""
    from .config import load_yaml, make_config, parse_param_overrides
    from .harness import run as run_harness

    values: dict[str, Any] = load_yaml(config) if config else {}
    values.update(_cli_values(
        method=method, dataset=dataset, sparsity=sparsity, seed=seed, preset=preset, base=base, device=device,
        data_root=data_root, download=download, base_steps=base_steps, finetune_steps=finetune_steps,
        batch_size=batch_size, lr=lr, ema_decay=ema_decay, precision=precision, sample_steps=sample_steps,
        timestep_spacing=timestep_spacing, num_samples=num_samples, fid_extractor=fid_extractor,
        inception_weights=inception_weights, latency_repeats=latency_repeats, latency_batch=latency_batch,
        results_dir=results_dir, cache_dir=cache_dir, run_id=run_id, resume=resume,
    ))
    if param:
        values["method_params"] = {**values.get("method_params", {}), **parse_param_overrides(param)}
    cfg = make_config(values)
    try:
        records = run_harness(cfg)
    except BenchError:
        raise
    except Exception as error:  # noqa: BLE001 - the record holds the traceback
        typer.echo(f"run failed: {type(error).__name__}: {error} (a failed record was written)", err=True)
        raise typer.Exit(code=1) from None
    from .summary import summary_table

    typer.echo(summary_table(records))


@app.command()
@friendly_errors
def methods() -> None:
    """List registered methods: name, family, init and what they do."""
    from .registry import get_method_class, method_names

    rows = [(n, get_method_class(n).family, get_method_class(n).init, get_method_class(n).description)
            for n in method_names()]
    width = max(len(r[0]) for r in rows)
    typer.echo(f"{'name':<{width}}  {'family':<12}  {'init':<10}  description")
    for name, family, init, description in rows:
        typer.echo(f"{name:<{width}}  {family:<12}  {init:<10}  {description}")


@app.command()
@friendly_errors
def datasets() -> None:
    """List the datasets the harness can load."""
    from .data import dataset_names, get_dataset_spec

    for name in dataset_names():
        spec = get_dataset_spec(name)
        typer.echo(f"{name:<12}  {spec.description}")


@app.command()
@friendly_errors
def macs(
    preset: str = typer.Option("tiny", help="UNet preset to count."),
) -> None:
    """Print MACs (fvcore, batch 1, one UNet forward) and params of a preset, by operator family."""
    from .data import get_dataset_spec  # noqa: F401 - registers datasets
    from .metrics.macs import COUNTER, count_macs
    from .models import PRESETS, build_model, count_params

    model = build_model(preset)
    config = PRESETS[preset]
    shape = (config["in_channels"], config["sample_size"], config["sample_size"])
    report = count_macs(model, shape)
    total, _ = count_params(model)
    typer.echo(f"preset {preset}: input {shape}, counter {COUNTER}")
    typer.echo(f"  params          {total / 1e6:10.3f} M")
    typer.echo(f"  MACs total      {report.total / 1e9:10.4f} G")
    for family in ("conv", "linear", "attention", "other"):
        typer.echo(f"    {family:<12}  {report.by_family.get(family, 0) / 1e9:10.4f} G")
    typer.echo(f"  conv+linear     {report.conv_linear / 1e9:10.4f} G")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
