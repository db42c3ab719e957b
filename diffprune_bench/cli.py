"""The ``diffbench`` command line (typer).

Usage errors (bad values, unknown names, missing files) print one line and exit with code 2; a run
that fails after it started prints one line, leaves a failed record, and exits with code 1.
"""

from __future__ import annotations

import functools
import shlex
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


def run_default(name: str) -> str:
    """What ``--help`` shows as a run option's default: RunConfig's value, or where the dataset sets it,
    "dataset default" and the digits value (read from the one place runs read it, without importing torch)."""
    from diffprune_bench.config import RunConfig
    from diffprune_bench.protocol_defaults import DIGITS_DEFAULTS

    value = getattr(RunConfig(), name)
    if value is None and name in DIGITS_DEFAULTS:
        return f"dataset default; digits: {DIGITS_DEFAULTS[name]}"
    if isinstance(value, bool):
        return f"--no-{name.replace('_', '-')}" if not value else f"--{name.replace('_', '-')}"
    return str(value)


@app.command()
@friendly_errors
def run(
    method: str = typer.Option(None, "--method", "-m", help="Method name (see `diffbench methods`).",
                               show_default=run_default("method")),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Dataset name (see `diffbench datasets`).",
                                show_default=run_default("dataset")),
    sparsity: float = typer.Option(None, help="Target sparsity in [0, 1): MACs removed (structured) or weights.",
                                   show_default=run_default("sparsity")),
    seed: int = typer.Option(None, help="Seed of the base, training and evaluation noise.",
                             show_default=run_default("seed")),
    config: Path = typer.Option(None, "--config", "-c", help="YAML file with any of these options.",
                                show_default="none"),
    preset: str = typer.Option(None, help="UNet preset.", show_default=run_default("preset")),
    base: str = typer.Option(None, help="Pretrained base: save_pretrained folder, hub id, or the name of a "
                             "base shipped with the package (`fashion-mnist`); `train` trains one.",
                             show_default="dataset default; digits: train the base once and cache it; "
                             "fashion-mnist: the shipped base"),
    device: str = typer.Option(None, help="auto | cpu | cuda", show_default=run_default("device")),
    data_root: str = typer.Option(None, envvar="DIFFBENCH_DATA", help="Folder holding real datasets.",
                                  show_default="./data"),
    download: bool = typer.Option(None, "--download/--no-download", help="Download missing data when online.",
                                  show_default=run_default("download")),
    resolution: int = typer.Option(None, help="Image size for celeba / imagefolder.",
                                   show_default="dataset default; digits: 8, fixed"),
    num_workers: int = typer.Option(None, help="Data loader processes.", show_default="automatic"),
    threads: int = typer.Option(None, help="CPU threads of the run (digits: 1, as in a sweep, so a hand-run cell "
                                "reproduces its sweep cell bit-for-bit).", show_default=run_default("threads")),
    base_steps: int = typer.Option(None, help="Training steps of the dense base.",
                                   show_default=run_default("base_steps")),
    finetune_steps: int = typer.Option(None, help="Fine-tuning steps of pretrained methods.",
                                       show_default=run_default("finetune_steps")),
    scratch_steps: int = typer.Option(None, help="Training steps of scratch methods (a dataset that sets none: "
                                      "the base steps).", show_default=run_default("scratch_steps")),
    batch_size: int = typer.Option(None, help="Training batch size.", show_default=run_default("batch_size")),
    lr: float = typer.Option(None, help="AdamW learning rate.", show_default=run_default("lr")),
    ema_decay: float = typer.Option(None, help="EMA decay (0 disables).", show_default=run_default("ema_decay")),
    precision: str = typer.Option(None, help="fp32 | bf16 | fp16 (autocast).", show_default=run_default("precision")),
    channels_last: bool = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC memory format.",
                                       show_default=run_default("channels_last")),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile training and sampling.",
                                 show_default=run_default("compile")),
    sample_steps: int = typer.Option(None, help="DDIM sampling steps.", show_default=run_default("sample_steps")),
    timestep_spacing: str = typer.Option(None, help="leading | trailing | linspace | quad",
                                         show_default=run_default("timestep_spacing")),
    num_samples: int = typer.Option(None, help="Generated samples for FID/KID.",
                                    show_default=run_default("num_samples")),
    fid_extractor: str = typer.Option(None, help="digits-net | digits-mlp | fashion-net | fashion-mlp | inception-v3",
                                      show_default=run_default("fid_extractor")),
    inception_weights: str = typer.Option(None, envvar="DIFFBENCH_INCEPTION_WEIGHTS", help="Inception .pt file.",
                                          show_default="the cache's copy, else downloaded once"),
    latency_repeats: int = typer.Option(None, help="Timed sampling trajectories (median reported).",
                                        show_default=run_default("latency_repeats")),
    latency_batch: int = typer.Option(None, help="Batch size of the latency measurement.",
                                      show_default=run_default("latency_batch")),
    results_dir: str = typer.Option(None, help="Where run folders are written.",
                                    show_default=run_default("results_dir")),
    cache_dir: str = typer.Option(None, help="Cache of base models, extractors and reference statistics.",
                                  show_default=run_default("cache_dir")),
    run_id: str = typer.Option(None, help="Run id: the name of the run folder.",
                               show_default="time-dataset-method-sparsity-seed"),
    resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from the run's checkpoint.",
                                show_default=run_default("resume")),
    replace: bool = typer.Option(None, "--replace/--no-replace", help="Let --run-id name a finished run and "
                                 "overwrite it (refused otherwise, so no result is lost by accident).",
                                 show_default="no-replace"),
    checkpoint_every: str = typer.Option(None, help="Training checkpoint every N steps (500) or every duration "
                                         "(90s, 5m).", show_default="500 steps or 60 s, whichever comes first"),
    param: list[str] = typer.Option(None, "--param", "-p", help="Method parameter name=value (repeatable).",
                                    show_default="the method's paper defaults"),
    then: str = typer.Option(None, "--then", help="Sampler-level method applied after it (steps | deepcache).",
                             show_default="none"),
    then_param: list[str] = typer.Option(None, "--then-param", "-P",
                                         help="Parameter of the --then method name=value (repeatable).",
                                         show_default="the --then method's defaults"),
) -> None:
    """Run one method on one dataset at one sparsity and write its record(s)."""
    from diffprune_bench.config import load_yaml, make_config, parse_checkpoint_every, parse_param_overrides

    values: dict[str, Any] = load_yaml(config) if config else {}
    values.update(_cli_values(
        method=method, dataset=dataset, sparsity=sparsity, seed=seed, preset=preset, base=base, device=device,
        data_root=data_root, download=download, resolution=resolution, num_workers=num_workers,
        threads=threads,
        channels_last=channels_last, compile=compile, base_steps=base_steps, finetune_steps=finetune_steps,
        scratch_steps=scratch_steps,
        batch_size=batch_size, lr=lr, ema_decay=ema_decay, precision=precision, sample_steps=sample_steps,
        timestep_spacing=timestep_spacing, num_samples=num_samples, fid_extractor=fid_extractor,
        inception_weights=inception_weights, latency_repeats=latency_repeats, latency_batch=latency_batch,
        results_dir=results_dir, cache_dir=cache_dir, run_id=run_id, resume=resume, replace_existing=replace,
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
    except KeyboardInterrupt as interrupt:  # Ctrl-C: say where the checkpoint is and how to go on
        typer.echo(interrupted_message(interrupt, sys.argv[1:]), err=True)
        raise typer.Exit(code=130) from None
    except Exception as error:  # noqa: BLE001 - the record holds the traceback
        written = getattr(error, "failed_record", None)
        where = f"failed record: {written}" if written else "no record could be written"
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        typer.echo(f"run failed: {reason} ({where})", err=True)
        raise typer.Exit(code=1) from None
    from diffprune_bench.report.summary import summary_table

    if records:  # on several processes only rank 0 evaluates and returns records
        typer.echo(summary_table(records))


RUN_ID_OPTIONS = ("--run-id", "--resume", "--no-resume")


def resume_command(argv: list[str], run_id: str) -> str:
    """The command line that continues this run: the same options, ``--run-id <id> --resume``."""
    kept: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--run-id":
            skip = True
        elif token not in RUN_ID_OPTIONS and not token.startswith("--run-id="):
            kept.append(token)
    if not kept or kept[0] != "run":
        kept.insert(0, "run")
    return shlex.join(["diffbench", *kept, "--run-id", run_id, "--resume"])


def interrupted_message(interrupt: KeyboardInterrupt, argv: list[str]) -> str:
    """One line for a Ctrl-C: where training's checkpoint is and the exact command to resume from it."""
    checkpoint = getattr(interrupt, "checkpoint", None)
    if checkpoint is None or not Path(checkpoint).is_file():
        return "interrupted: no training checkpoint to resume from; run the same command again"
    run_id = Path(checkpoint).parent.parent.name  # <results-dir>/<run-id>/checkpoint/<file>
    step, total = getattr(interrupt, "step", "?"), getattr(interrupt, "total", "?")
    return (f"interrupted at training step {step} of {total}: checkpoint {checkpoint}; resume with: "
            f"{resume_command(argv, run_id)}")


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
                                    help="With --method: name=value, validated (tolerance=... changes the sizing; "
                                    "scoring parameters never change the widths)."),
    device: str = typer.Option("cpu", help="With --method: device the preset is sized on."),
) -> None:
    """Print MACs (fvcore, batch 1, one UNet forward) and params of a preset, by operator family.

    With --method, size a fresh preset at the MAC target and print dense vs pruned: the widths depend
    only on the MAC target, so the method's scoring pass (e.g. Diff-Pruning's timestep walk) is not run.
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
    results_dir: str = typer.Option(None, help="Run folders.", show_default="the suite's, else results/runs"),
    cache_dir: str = typer.Option(None, help="Cache of base models, extractors and reference statistics.",
                                  show_default="the suite's, else .diffbench-cache"),
    device: str = typer.Option(None, help="auto | cpu | cuda", show_default="the suite's, else auto"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells still to run; run nothing.",
                                 show_default="off"),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Cells at once: worker processes (local), array tasks "
                             "(slurm) or jobs (submitit-local).", show_default="local: 1; slurm: no cap"),
    status: bool = typer.Option(False, "--status", help="Show where every cell stands (records); run nothing.",
                                show_default="off"),
    seeds: str = typer.Option(None, "--seeds", help="Only these of the suite's seeds, comma-separated (a slice: "
                              "its records are the suite's, so later slices resume around them).",
                              show_default="every seed of the suite"),
    executor: str = typer.Option("local", help="local | slurm | submitit-local (submitit jobs on this machine)."),
    partition: str = typer.Option(None, help="SLURM partition.", show_default="the cluster's default"),
    gpus_per_run: int = typer.Option(None, help="GPUs per run: one DDP process each (cluster executors).",
                                     show_default="1"),
    cpus_per_run: int = typer.Option(None, help="CPU cores per run (cluster executors).",
                                     show_default="the cluster's default"),
    mem_gb: float = typer.Option(None, help="Memory per run in GB (cluster executors).",
                                 show_default="the cluster's default"),
    timeout_min: int = typer.Option(None, help="Time limit of a job in minutes; a run past it requeues and "
                                    "resumes from its checkpoint.", show_default="1440"),
    max_timeouts: int = typer.Option(None, help="Requeues after hitting the time limit.", show_default="3"),
    slurm_param: list[str] = typer.Option(None, "--slurm-param", help="Other sbatch option name=value "
                                          "(repeatable: account=..., qos=..., constraint=...).", show_default="none"),
    wait: bool = typer.Option(None, "--wait/--no-wait", help="Wait for cluster jobs.",
                              show_default="slurm: --no-wait; submitit-local: --wait"),
) -> None:
    """Run every cell of a suite that has no ok record yet; exit code = number of failed cells."""
    from diffprune_bench.sweep.cluster import cluster_options
    from diffprune_bench.sweep.suite import load_suite
    from diffprune_bench.sweep.suite import sweep as run_sweep

    overrides = _cli_values(results_dir=results_dir, cache_dir=cache_dir, device=device)
    loaded = load_suite(suite)
    if seeds is not None:
        loaded = loaded.with_seeds(seed_slice(seeds, loaded.seeds))
    if status:
        from diffprune_bench.sweep.status import format_status, sweep_status

        typer.echo(format_status(loaded, sweep_status(loaded, overrides)))
        return
    cluster = cluster_options(executor, jobs, slurm_param, partition=partition, gpus_per_run=gpus_per_run,
                              cpus_per_run=cpus_per_run, mem_gb=mem_gb, timeout_min=timeout_min,
                              max_timeouts=max_timeouts, wait=wait)
    result = run_sweep(loaded, overrides, dry_run=dry_run, jobs=1 if jobs is None else jobs,
                       cluster=cluster)
    if result.failures:
        raise typer.Exit(code=min(result.failures, 125))


def seed_slice(text: str, allowed: list[int]) -> list[int]:
    """``--seeds 0,2`` as a list of the suite's seeds (a usage error names what the suite has)."""
    try:
        picked = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    outside = [seed for seed in picked if seed not in allowed]
    if not picked or outside:
        raise BenchError(f"--seeds {text!r}: the suite's seeds are {', '.join(map(str, allowed))}")
    return sorted(set(picked))


@app.command()
@friendly_errors
def leaderboard(
    results_dir: str = typer.Option("results/runs", help="Folder searched (recursively) for records."),
    out: str = typer.Option("results", help="Where leaderboard.md, leaderboard.csv and plots/ are written."),
    suite: list[str] = typer.Option(None, "--suite", help="Only records of this suite name (repeatable); "
                                    "also writes their raw data to OUT/data/SUITE and renders from it.",
                                    show_default="every suite's records"),
    from_data: list[str] = typer.Option(None, "--from-data", help="Render from committed raw data (a folder "
                                        "OUT/data/SUITE, repeatable) instead of run folders; runs no model.",
                                        show_default="none: the run folders"),
    data: bool = typer.Option(True, "--data/--no-data", help="With --suite: write OUT/data/SUITE (--no-data: "
                              "render straight from the run folders)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Also draw results/plots/*.png|svg."),
    site: bool = typer.Option(True, "--site/--no-site", help="Also write the web page results/site/index.html."),
) -> None:
    """Render the leaderboard (Markdown + CSV) and plots from every record."""
    from diffprune_bench.report import raw_data
    from diffprune_bench.report.leaderboard import write_from_records, write_leaderboard

    folders = [Path(folder) for folder in from_data or []]
    if not folders and suite and data:
        for written_data in raw_data.write_data(results_dir, Path(out) / "data", suite):
            typer.echo(f"data: {written_data.folder} ({written_data.records} records, "
                       f"{written_data.bytes / 1e6:.1f} MB)")
            folders.append(written_data.folder)
        typer.echo(f"data: all tables {raw_data.budget_line(Path(out) / 'data')}")
    if folders:  # the tables come from the data folders, exactly as a fresh clone renders them
        written = write_from_records(raw_data.load_data(folders), out, suites=suite or None, with_plots=plots)
    else:
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
def rescore(
    results_dir: Path = typer.Argument(..., help="Folder searched (recursively) for records."),
    suite: list[str] = typer.Option(None, "--suite", help="Only records of this suite name (repeatable)."),
    cache_dir: str = typer.Option(None, help="Cache of extractors and reference statistics (default: the runs')."),
    device: str = typer.Option(None, help="auto | cpu | cuda (default: the runs'; features must match theirs)."),
) -> None:
    """Add the feature spaces and PRDC that finished records lack, from their kept samples (no model runs).

    Exit code 1 when any record was refused (its recomputed primary features differ from the run's)."""
    from diffprune_bench.rescore import rescore as run_rescore

    outcome = run_rescore(results_dir, suites=suite or None, cache_dir=cache_dir, device=device)
    typer.echo(outcome.summary())
    if outcome.refused:
        raise typer.Exit(code=1)


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
    jobs: int = typer.Option(1, "--jobs", help="Cells run at once (one worker process each)."),
) -> None:
    """Run a suite and fail (exit 1) when any row's FID is worse than baseline + its seed-spread tolerance."""
    if jobs < 1:
        raise BenchError(f"--jobs {jobs} must be a positive integer (cells run at once)")
    from diffprune_bench.sweep.regress import format_table
    from diffprune_bench.sweep.regress import regress as run_regress
    from diffprune_bench.sweep.suite import load_suite

    outcome = run_regress(load_suite(suite), baseline, update=update_baseline, results_dir=results_dir,
                          baseline_seeds=baseline_seeds, jobs=jobs,
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
