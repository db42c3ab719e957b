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

from diffprune_bench.errors import BenchError

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
    resolution: int = typer.Option(None, help="Image size for celeba / imagefolder (default: the dataset's)."),
    num_workers: int = typer.Option(None, help="Data loader processes (default: automatic)."),
    base_steps: int = typer.Option(None, help="Training steps of the dense base."),
    finetune_steps: int = typer.Option(None, help="Fine-tuning steps of pretrained methods."),
    scratch_steps: int = typer.Option(None, help="Training steps of scratch methods (default: base steps)."),
    batch_size: int = typer.Option(None, help="Training batch size."),
    lr: float = typer.Option(None, help="AdamW learning rate."),
    ema_decay: float = typer.Option(None, help="EMA decay (0 disables)."),
    precision: str = typer.Option(None, help="fp32 | bf16 | fp16 (autocast)."),
    channels_last: bool = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory format."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile training and sampling."),
    sample_steps: int = typer.Option(None, help="DDIM sampling steps."),
    timestep_spacing: str = typer.Option(None, help="leading | trailing | linspace | quad"),
    num_samples: int = typer.Option(None, help="Generated samples for FID/KID."),
    fid_extractor: str = typer.Option(None, help="digits-net | fashion-net | inception-v3"),
    inception_weights: str = typer.Option(None, envvar="DIFFBENCH_INCEPTION_WEIGHTS", help="Inception .pt file."),
    latency_repeats: int = typer.Option(None, help="Timed sampling trajectories (median reported)."),
    latency_batch: int = typer.Option(None, help="Batch size of the latency measurement."),
    results_dir: str = typer.Option(None, help="Where run folders are written."),
    cache_dir: str = typer.Option(None, help="Cache of base models, extractors and reference statistics."),
    run_id: str = typer.Option(None, help="Run id (default: time, dataset, method, sparsity, seed)."),
    resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from the run's checkpoint."),
    checkpoint_every: str = typer.Option(None, help="Training checkpoint every N steps (500) or every duration "
                                         "(90s, 5m; default: 500 steps or 60 s, whichever comes first)."),
    param: list[str] = typer.Option(None, "--param", "-p", help="Method parameter name=value (repeatable)."),
    then: str = typer.Option(None, "--then", help="Sampler-level method applied after it (steps | deepcache)."),
    then_param: list[str] = typer.Option(None, "--then-param", "-P",
                                         help="Parameter of the --then method name=value (repeatable)."),
) -> None:
    """Run one method on one dataset at one sparsity and write its record(s)."""
    from diffprune_bench.config import load_yaml, make_config, parse_checkpoint_every, parse_param_overrides

    values: dict[str, Any] = load_yaml(config) if config else {}
    values.update(_cli_values(
        method=method, dataset=dataset, sparsity=sparsity, seed=seed, preset=preset, base=base, device=device,
        data_root=data_root, download=download, resolution=resolution, num_workers=num_workers,
        channels_last=channels_last, compile=compile, base_steps=base_steps, finetune_steps=finetune_steps,
        scratch_steps=scratch_steps,
        batch_size=batch_size, lr=lr, ema_decay=ema_decay, precision=precision, sample_steps=sample_steps,
        timestep_spacing=timestep_spacing, num_samples=num_samples, fid_extractor=fid_extractor,
        inception_weights=inception_weights, latency_repeats=latency_repeats, latency_batch=latency_batch,
        results_dir=results_dir, cache_dir=cache_dir, run_id=run_id, resume=resume,
    ))
    if param:
        values["method_params"] = {**values.get("method_params", {}), **parse_param_overrides(param)}
    if then:
        values["then"] = then
    if then_param:
        values["then_params"] = {**values.get("then_params", {}), **parse_param_overrides(then_param)}
    if checkpoint_every is not None:
        values.update(parse_checkpoint_every(checkpoint_every))
    cfg = make_config(values)  # every option and method parameter checked before the heavy imports
    from diffprune_bench.harness import run as run_harness

    try:
        records = run_harness(cfg)
    except BenchError:
        raise
    except Exception as error:  # noqa: BLE001 - the record holds the traceback
        written = getattr(error, "failed_record", None)
        where = f"failed record: {written}" if written else "no record could be written"
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        typer.echo(f"run failed: {reason} ({where})", err=True)
        raise typer.Exit(code=1) from None
    from diffprune_bench.report.summary import summary_table

    if records:  # on several processes only rank 0 evaluates and returns records
        typer.echo(summary_table(records))


@app.command()
@friendly_errors
def methods() -> None:
    """List registered methods: name, family, init and what they do."""
    from diffprune_bench.registry import get_method_class, method_names

    rows = [(get_method_class(n).display_name or n, get_method_class(n).family, get_method_class(n).init,
             get_method_class(n).description) for n in method_names()]
    width = max(len(r[0]) for r in rows)
    typer.echo(f"{'name':<{width}}  {'family':<12}  {'init':<10}  description")
    for name, family, init, description in rows:
        typer.echo(f"{name:<{width}}  {family:<13}  {init:<10}  {description}")


@app.command()
@friendly_errors
def datasets() -> None:
    """List the datasets the harness can load."""
    from diffprune_bench.data import dataset_names, get_dataset_spec

    for name in dataset_names():
        spec = get_dataset_spec(name)
        typer.echo(f"{name:<12}  {spec.description}")


@app.command()
@friendly_errors
def macs(
    preset: str = typer.Option("tiny", help="UNet preset to count."),
    method: str = typer.Option(None, "--method", "-m", help="Structured method: prune the preset and compare."),
    sparsity: float = typer.Option(0.5, help="With --method: fraction of MACs to remove."),
    param: list[str] = typer.Option(None, "--param", "-p",
                                    help="With --method: name=value (e.g. max_timesteps=20 for a short walk)."),
    device: str = typer.Option("cpu", help="With --method: device of the (random-data) gradient pass."),
) -> None:
    """Print MACs (fvcore, batch 1, one UNet forward) and params of a preset, by operator family.

    With --method, prune a fresh preset (random images feed gradient criteria; widths depend only on
    the MAC target) and print dense vs pruned.
    """
    from diffprune_bench.data import get_dataset_spec  # noqa: F401 - registers datasets
    from diffprune_bench.metrics.macs import COUNTER, count_macs
    from diffprune_bench.models import PRESETS, build_model, count_params

    if method:
        from diffprune_bench.config import parse_param_overrides
        from diffprune_bench.toolkit.structural import prune_preset_report

        typer.echo(prune_preset_report(preset, method, sparsity, parse_param_overrides(param or []), device))
        return
    model = build_model(preset)
    config = PRESETS[preset]
    shape = (config["in_channels"], config["sample_size"], config["sample_size"])
    report = count_macs(model, shape)
    total, _ = count_params(model)
    typer.echo(f"preset {preset}: input {shape}, counter {COUNTER}")
    typer.echo(f"  params          {total / 1e6:10.3f} M")
    typer.echo(f"  MACs total      {report.total / 1e9:10.4f} G")
    for family in ("conv", "linear", "attention", "other"):
        typer.echo(f"    {family:<13}  {report.by_family.get(family, 0) / 1e9:10.4f} G")
    typer.echo(f"  conv+linear     {report.conv_linear / 1e9:10.4f} G")


@app.command()
@friendly_errors
def sweep(
    suite: Path = typer.Argument(..., help="Suite YAML (benchmarks/*.yaml)."),
    results_dir: str = typer.Option(None, help="Run folders (default: the suite's, else results/runs)."),
    cache_dir: str = typer.Option(None, help="Cache of base models, extractors and reference statistics."),
    device: str = typer.Option(None, help="auto | cpu | cuda"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells still to run; run nothing."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Cells at once: worker processes (local, default 1), "
                             "array tasks (slurm) or jobs (submitit-local)."),
    status: bool = typer.Option(False, "--status", help="Show where every cell stands (records); run nothing."),
    executor: str = typer.Option("local", help="local | slurm | submitit-local (submitit jobs on this machine)."),
    partition: str = typer.Option(None, help="SLURM partition."),
    gpus_per_run: int = typer.Option(None, help="GPUs per run: one DDP process each (cluster executors)."),
    cpus_per_run: int = typer.Option(None, help="CPU cores per run (cluster executors)."),
    mem_gb: float = typer.Option(None, help="Memory per run in GB (cluster executors)."),
    timeout_min: int = typer.Option(None, help="Time limit of a job in minutes; a run past it requeues and "
                                    "resumes from its checkpoint (default 1440)."),
    max_timeouts: int = typer.Option(None, help="Requeues after hitting the time limit (default 3)."),
    slurm_param: list[str] = typer.Option(None, "--slurm-param", help="Other sbatch option name=value "
                                          "(repeatable: account=..., qos=..., constraint=...)."),
    wait: bool = typer.Option(None, "--wait/--no-wait", help="Wait for cluster jobs (default: slurm no)."),
) -> None:
    """Run every cell of a suite that has no ok record yet; exit code = number of failed cells."""
    from diffprune_bench.sweep.cluster import cluster_options
    from diffprune_bench.sweep.suite import load_suite
    from diffprune_bench.sweep.suite import sweep as run_sweep

    overrides = _cli_values(results_dir=results_dir, cache_dir=cache_dir, device=device)
    loaded = load_suite(suite)
    if status:
        from diffprune_bench.sweep.status import format_status, sweep_status

        typer.echo(format_status(loaded, sweep_status(loaded, overrides)))
        return
    cluster = cluster_options(executor, jobs, slurm_param, partition=partition, gpus_per_run=gpus_per_run,
                              cpus_per_run=cpus_per_run, mem_gb=mem_gb, timeout_min=timeout_min,
                              max_timeouts=max_timeouts, wait=wait)
    result = run_sweep(loaded, overrides, dry_run=dry_run, jobs=jobs or 1,
                       cluster=cluster)
    if result.failures:
        raise typer.Exit(code=min(result.failures, 125))


@app.command()
@friendly_errors
def leaderboard(
    results_dir: str = typer.Option("results/runs", help="Folder searched (recursively) for records."),
    out: str = typer.Option("results", help="Where leaderboard.md, leaderboard.csv and plots/ are written."),
    suite: list[str] = typer.Option(None, "--suite", help="Only records of this suite name (repeatable)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Also draw results/plots/*.png|svg."),
    site: bool = typer.Option(True, "--site/--no-site", help="Also write the web page results/site/index.html."),
) -> None:
    """Render the leaderboard (Markdown + CSV) and plots from every record."""
    from diffprune_bench.report.leaderboard import write_leaderboard

    written = write_leaderboard(results_dir, out, suites=suite or None, with_plots=plots)
    board = written["board"]
    plot_files = sum(len(p) for p in written["plots"].values())
    typer.echo(f"{len(board.groups)} table(s) from {board.records} records, "
               f"{len(board.failed)} failed run(s): {written['markdown']}, {written['csv']}, "
               f"{plot_files} plot files")
    if site:
        from diffprune_bench.report.site import write_site

        index = write_site(board, written["records"], Path(out) / "site")
        typer.echo(f"site: {index} ({index.stat().st_size:,} bytes)")


@app.command()
@friendly_errors
def regress(
    suite: Path = typer.Option(Path("benchmarks/digits-ci.yaml"), "--suite", help="Suite YAML to run."),
    baseline: Path = typer.Option(Path("results/ci-baseline.json"), help="Baseline JSON (FID, std per row)."),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="Measure, rewrite the baseline."),
    baseline_seeds: int = typer.Option(3, help="Seeds --update-baseline measures if the suite lists one."),
    results_dir: str = typer.Option(None, help="Run folder (default: a fresh results/runs/regress/<time>)."),
    cache_dir: str = typer.Option(None, help="Bases, extractors (default: fresh, in the run folder)."),
    device: str = typer.Option(None, help="auto | cpu | cuda"),
) -> None:
    """Run a suite and fail (exit 1) when any row's FID is worse than baseline + its seed-spread tolerance."""
    from diffprune_bench.sweep.regress import format_table
    from diffprune_bench.sweep.regress import regress as run_regress
    from diffprune_bench.sweep.suite import load_suite

    outcome = run_regress(load_suite(suite), baseline, update=update_baseline, results_dir=results_dir,
                          baseline_seeds=baseline_seeds,
                          overrides=_cli_values(cache_dir=cache_dir, device=device))
    typer.echo(format_table(outcome.comparisons))
    if outcome.updated:
        typer.echo(f"baseline written: {baseline}")
    if outcome.exit_code:
        bad = sum(c.failed for c in outcome.comparisons)
        typer.echo(f"regression check failed: {bad} row(s) regressed, failed or missing", err=True)
        raise typer.Exit(code=outcome.exit_code)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
