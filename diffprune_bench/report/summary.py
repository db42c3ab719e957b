"""The short table ``diffbench run`` prints at the end of a run."""

from __future__ import annotations

from typing import Any

from diffprune_bench.targets import TARGET_TOLERANCE, target_report


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _saved(record: dict[str, Any]) -> tuple[str, bool]:
    """The realised saving (trajectory MACs, ``metrics.macs_reduction``) and whether it misses the target."""
    realised = (record.get("metrics") or {}).get("macs_reduction")
    target = record.get("target") or target_report(record.get("sparsity"), realised)
    missed = bool(target and target.get("missed"))
    return _fmt(realised, "6.2f") + ("!" if missed else " "), missed


def summary_table(records: list[dict[str, Any]]) -> str:
    """One line per record; run ids are printed whole (they are what ``--run-id``/``--resume`` take).
    The requested target and the saving realised stand side by side; a miss of more than the
    leaderboard's tolerance is marked ``!`` and explained under the table."""
    width = max([3, *(len(str(record["run_id"])) for record in records)])
    header = f"{'run':<{width}} {'target':>6} {'saved':>7} {'FID':>8} {'KID':>8} {'GMACs':>9} {'eff.GMACs':>9} " \
             f"{'params':>9} {'SSIM':>6} {'latency':>8} {'speedup':>7}"
    lines = [header, "-" * len(header)]
    misses = 0
    for record in records:
        m = record.get("metrics", {})
        saved, missed = _saved(record)
        misses += missed
        lines.append(
            f"{record['run_id']:<{width}} {_fmt(record.get('sparsity'), '6.2f')} {saved} {_fmt(m.get('fid'), '8.3f')} "
            f"{_fmt(m.get('kid'), '8.4f')} {_fmt(m.get('macs_dense', 0) / 1e9, '9.4f')} "
            f"{_fmt(m.get('macs_effective', 0) / 1e9, '9.4f')} {_fmt(m.get('params_nonzero'), '9d')} "
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
    return "\n".join(lines)
