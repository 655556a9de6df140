"""Benchmarks over Hydra sweeps: `hades-bench` jobs (`jobs.py`) and `hades-report` (`report.py`)."""
