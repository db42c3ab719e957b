"""The table ``diffbench run`` prints (diffprune_bench/summary.py)."""

from __future__ import annotations

from diffprune_bench.report.summary import summary_table


def record(run_id: str, sparsity: float, fid: float) -> dict:
    return {
        "run_id": run_id,
        "sparsity": sparsity,
        "metrics": {"fid": fid, "kid": 0.01, "macs_dense": 2e9, "macs_effective": 1e9, "params_nonzero": 1234,
                    "ssim_to_dense": 0.9, "latency": {"median_s": 0.5}, "speedup": 1.5},
        "protocol": {"extractor": "digits-net", "num_samples": 200, "sampler": {"steps": 10}, "fid_floor": 0.8},
        "paths": {"run_dir": f"runs/{run_id}"},
    }


def test_long_run_ids_are_printed_whole_and_columns_line_up():
    base = "20261125-162944-digits-sparsedm-s0.5-seed0-aac9a9"
    records = [record(base, 0.5, 4.29), record(f"{base}-1-4", 0.75, 16.752)]
    lines = summary_table(records).splitlines()
    assert lines[2].startswith(f"{base} ") and lines[3].startswith(f"{base}-1-4 ")
    # every value starts in the same column as its header
    fid_column = lines[0].index("     FID") + len("     FID")
    assert lines[2][:fid_column].endswith("4.290") and lines[3][:fid_column].endswith("16.752")
    assert lines[4] == "protocol: digits-net FID on 200 samples, DDIM 10 steps; data-vs-data floor 0.800; " \
                       f"record: runs/{base}/record.json"
