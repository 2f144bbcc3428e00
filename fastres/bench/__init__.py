"""Benchmark harness shared by `python -m fastres.bench` and the pytest-benchmark suites in benchmarks/."""
from .timing import Timing, time_round_robin

__all__ = ["Timing", "time_round_robin"]
