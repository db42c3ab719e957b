"""The short table ``diffbench run`` prints at the end of a run."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(records: list[dict[str, Any]]) -> str:
    """One line per record; run ids are printed whole (they are what ``--run-id``/``--resume`` take)."""
    width = max([3, *(len(str(record["run_id"])) for record in records)])
    header = f"{'run':<{width}} {'sparsity':>8} {'FID':>8} {'KID':>8} {'GMACs':>9} {'eff.GMACs':>9} " \
             f"{'params':>9} {'SSIM':>6} {'latency':>8} {'speedup':>7}"
    lines = [header, "-" * len(header)]
    for record in records:
        m = record.get("metrics", {})
        lines.append(
            f"{record['run_id']:<{width}} {_fmt(record.get('sparsity'), '8.2f')} {_fmt(m.get('fid'), '8.3f')} "
            f"{_fmt(m.get('kid'), '8.4f')} {_fmt(m.get('macs_dense', 0) / 1e9, '9.4f')} "
            f"{_fmt(m.get('macs_effective', 0) / 1e9, '9.4f')} {_fmt(m.get('params_nonzero'), '9d')} "
            f"{_fmt(m.get('ssim_to_dense'), '6.3f')} {_fmt(m.get('latency', {}).get('median_s'), '7.3f')}s "
            f"{_fmt(m.get('speedup'), '6.2f')}x"
        )
    if records:
        protocol = records[0].get("protocol", {})
        lines.append(
            f"protocol: {protocol.get('extractor')} FID on {protocol.get('num_samples')} samples, "
            f"DDIM {protocol.get('sampler', {}).get('steps')} steps; data-vs-data floor "
            f"{_fmt(protocol.get('fid_floor'), '.3f')}; record: {records[0]['paths']['run_dir']}/record.json"
        )
    return "\n".join(lines)
