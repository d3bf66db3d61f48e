"""Memory under repetition: many `sample` calls keep the resident set flat."""

import json
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_repeat_memory.py"


def growth(calls: int) -> dict:
    out = subprocess.run([sys.executable, str(BENCH), "--calls", str(calls), "--warmup", "10"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_repeated_sampling_keeps_rss_flat():
    result = growth(20)
    assert result["growth_mib"] < 16, result  # a leak of a KV cache or a graph per call would add far more


@pytest.mark.slow
def test_hundred_sample_calls_keep_rss_flat():
    result = growth(100)
    assert result["growth_mib"] < 16, result
