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


def test_the_notes_say_what_latency_macs_and_kid_mean_with_the_runs_numbers():
    one = record("dense-run", 0.0, 0.334)
    one["metrics"].update(sample_steps=50, macs_trajectory_effective=1.06e9,
                          latency={"median_s": 0.5, "steps": 50, "batch": 16, "repeats": 10, "threads": 1})
    text = summary_table([one])
    assert "latency: wall time of one full 50-step DDIM trajectory at batch 16, median of 10 timings, " \
           "1 CPU thread(s)" in text
    assert "GMACs: one UNet forward at batch 1" in text and "whole 50-step sampling trajectory" in text
    assert "KID: an unbiased estimate, so near zero it can be slightly negative" in text
    header, _, row = text.splitlines()[:3]
    column = header.index("traj.GMACs") + len("traj.GMACs")
    assert row[:column].endswith("1.060")  # the trajectory total per image, in its own column
    fewer = record("steps-run", 0.5, 0.9)
    fewer["metrics"].update(sample_steps=25, latency={"median_s": 0.25, "steps": 25, "batch": 16, "repeats": 10})
    assert "one full N-step (N per row: 25, 50) DDIM trajectory" in summary_table([one, fewer])
