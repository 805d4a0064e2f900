"""Benchmarks of proj against stock Celery: `python -m bench` (see bench/common.py for the contract)."""
