"""Throughput of one `Linear(256, 768)` on this CPU against the number of rows, fp32 and bf16
autocast: at how many tokens a forward stops being overhead-bound (the argument for batching
prompts, and its limit). One thread by default.

Run:  .venv/bin/python benchmarks/bench_matmul.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def gflops(linear: torch.nn.Linear, rows: int, bf16: bool) -> float:
    x = torch.randn(rows, linear.in_features)
    repeats = max(20, 20000 // rows)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(5):
            linear(x)
        start = time.perf_counter()
        for _ in range(repeats):
            linear(x)
        seconds = (time.perf_counter() - start) / repeats
    return 2 * rows * linear.in_features * linear.out_features / seconds / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    linear = torch.nn.Linear(256, 768)
    print(f"{'rows':>6} {'fp32 GFLOP/s':>13} {'bf16 GFLOP/s':>13}")
    for rows in (1, 8, 49, 392, 1568):
        print(f"{rows:>6} {gflops(linear, rows, False):>13.1f} {gflops(linear, rows, True):>13.1f}")


if __name__ == "__main__":
    main()
