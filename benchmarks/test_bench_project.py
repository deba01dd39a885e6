"""pytest-benchmark twin of bench_project.py (not collected by the test suite).

    python -m pytest benchmarks/test_bench_project.py --benchmark-only
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_project import candidates  # noqa: E402


@pytest.mark.parametrize("t", [2, 8, 16])
@pytest.mark.parametrize("n", [295_000])
@pytest.mark.parametrize("impl", list(candidates()))
def test_project_cpu(benchmark, impl, t, n):
    x = torch.randn(t, n)
    benchmark.group = f"T={t} N={n}"
    benchmark(candidates()[impl], x)
