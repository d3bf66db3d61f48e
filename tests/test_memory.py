"""Memory under repetition: many `sample` calls keep the resident set flat."""

import json
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_repeat_memory.py"


def growth(calls: int, many: bool = False) -> dict:
    command = [sys.executable, str(BENCH), "--calls", str(calls), "--warmup", "10"] + (["--many"] if many else [])
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def test_repeated_sampling_keeps_rss_flat():
    result = growth(20)
    assert result["growth_mib"] < 16, result  # a leak of a KV cache or a graph per call would add far more


def test_repeated_sample_many_keeps_rss_flat():
    result = growth(20, many=True)
    assert result["growth_mib"] < 16, result


@pytest.mark.slow
@pytest.mark.parametrize("many", [False, True])
def test_hundred_calls_keep_rss_flat(many):
    result = growth(100, many)
    assert result["growth_mib"] < 16, result
