"""Orchestration of many runs: suites, executors (local pool, SLURM/submitit), status and the CI regression check."""
