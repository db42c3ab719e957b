"""The short table ``diffbench run`` prints at the end of a run, with notes saying what its columns mean.

A newcomer reading ``latency 0.412s`` or ``GMACs 0.0212`` cannot know whether that is one step or the
whole sampling run, one image or a batch, nor why KID can be negative; the notes under the table say it
with the run's own numbers (steps, batch, repeats), so the figures can be compared with the leaderboard's.
"""

from __future__ import annotations

from typing import Any

from diffprune_bench.targets import TARGET_TOLERANCE, target_report


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _giga(value: Any) -> float | None:
    return None if value is None else value / 1e9


def _saved(record: dict[str, Any]) -> tuple[str, bool]:
    """The realised saving (trajectory MACs, ``metrics.macs_reduction``) and whether it misses the target."""
    realised = (record.get("metrics") or {}).get("macs_reduction")
    target = record.get("target") or target_report(record.get("sparsity"), realised)
    missed = bool(target and target.get("missed"))
    return f"{_fmt(realised, '6.2f'):>6}" + ("!" if missed else " "), missed


def summary_table(records: list[dict[str, Any]]) -> str:
    """One line per record; run ids are printed whole (they are what ``--run-id``/``--resume`` take).
    The requested target and the saving realised stand side by side; a miss of more than the
    leaderboard's tolerance is marked ``!`` and explained under the table."""
    width = max([3, *(len(str(record["run_id"])) for record in records)])
    header = f"{'run':<{width}} {'target':>6} {'saved':>7} {'FID':>8} {'KID':>8} {'GMACs':>9} {'eff.GMACs':>9} " \
             f"{'traj.GMACs':>10} {'params':>9} {'SSIM':>6} {'latency':>8} {'speedup':>7}"
    lines = [header, "-" * len(header)]
    misses = 0
    for record in records:
        m = record.get("metrics", {})
        saved, missed = _saved(record)
        misses += missed
        lines.append(
            f"{record['run_id']:<{width}} {_fmt(record.get('sparsity'), '6.2f'):>6} {saved} "
            f"{_fmt(m.get('fid'), '8.3f')} "
            f"{_fmt(m.get('kid'), '8.4f')} {_fmt(m.get('macs_dense', 0) / 1e9, '9.4f')} "
            f"{_fmt(m.get('macs_effective', 0) / 1e9, '9.4f')} "
            f"{_fmt(_giga(m.get('macs_trajectory_effective')), '10.3f')} {_fmt(m.get('params_nonzero'), '9d')} "
            f"{_fmt(m.get('ssim_to_dense'), '6.3f')} {_fmt(m.get('latency', {}).get('median_s'), '7.3f')}s "
            f"{_fmt(m.get('speedup'), '6.2f')}x"
        )
    if misses:
        lines.append(f"! realised saving (trajectory MACs) more than {100 * TARGET_TOLERANCE:.0f} points off the "
                     "requested target: this row is not at the operating point it was asked for")
    if records:
        protocol = records[0].get("protocol", {})
        lines.append(
            f"protocol: {protocol.get('extractor')} FID on {protocol.get('num_samples')} samples, "
            f"DDIM {protocol.get('sampler', {}).get('steps')} steps; data-vs-data floor "
            f"{_fmt(protocol.get('fid_floor'), '.3f')}; record: {records[0]['paths']['run_dir']}/record.json"
        )
        lines.extend(column_notes(records))
    return "\n".join(lines)


def _steps_text(values: set[Any]) -> str:
    """``50-step`` for one step count, ``N-step (N per row: 25, 50)`` when rows differ."""
    known = sorted(v for v in values if v is not None)
    if len(known) == 1:
        return f"{known[0]}-step"
    return f"N-step (N per row: {', '.join(str(v) for v in known)})" if known else "N-step"


def column_notes(records: list[dict[str, Any]]) -> list[str]:
    """What latency, the MAC columns and KID mean, in the terms of these records."""
    metrics = [record.get("metrics", {}) for record in records]
    latency = [m.get("latency") or {} for m in metrics]
    steps = _steps_text({lat.get("steps", m.get("sample_steps")) for lat, m in zip(latency, metrics, strict=True)})
    batches = sorted({lat.get("batch") for lat in latency if lat.get("batch") is not None})
    repeats = sorted({lat.get("repeats") for lat in latency if lat.get("repeats") is not None})
    threads = sorted({lat.get("threads") for lat in latency if lat.get("threads") is not None})
    batch = "/".join(str(b) for b in batches) or "B"
    k = "/".join(str(r) for r in repeats) or "k"
    thread_text = f", {'/'.join(str(t) for t in threads)} CPU thread(s)" if threads else ""
    traj_steps = _steps_text({m.get("sample_steps") for m in metrics})
    return [
        f"latency: wall time of one full {steps} DDIM trajectory at batch {batch}, median of {k} timings"
        f"{thread_text}; speedup: the dense base's trajectory time / this one's.",
        "GMACs: one UNet forward at batch 1 (eff.GMACs: each conv/linear at its weight density); traj.GMACs: "
        f"the effective MACs of one image's whole {traj_steps} sampling trajectory (what the sparsity target saves).",
        "KID: an unbiased estimate, so near zero it can be slightly negative (read it as 0).",
    ]
