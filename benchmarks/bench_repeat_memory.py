"""Memory under repetition: RSS across many `sample` calls in one process.

Builds a small interleaved model (text + 2-D images, conditioning dropout), warms up with
`--warmup` calls, then makes `--calls` more `sample` calls (text prompt → image → text,
KV-cached, guided every other call) — or, with `--many`, `sample_many` batches of four such
prompts — and records the resident set size every 10 calls.
A leak (a cache, a layout or a graph kept alive between calls) shows as steady growth.

Run:  .venv/bin/python benchmarks/bench_repeat_memory.py [--calls 100] [--out benchmarks/bench_repeat_memory.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
from pathlib import Path

import torch

from transfusion_pytorch import Transfusion


def rss_mib() -> float:
    """Current resident set size (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(calls: int, warmup: int, many: bool = False) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Transfusion(
        num_text_tokens=32,
        dim_latent=8,
        modality_default_shape=(4, 4),
        add_pos_emb=True,
        unconditional_prob=0.1,
        transformer=dict(dim=64, depth=2, dim_head=16, heads=4),
    ).eval()
    ids = model.ids
    prompt = torch.tensor([3, 4, *ids.encode_shape((4, 4)), ids.som[0]])

    def one(i: int):
        if many:
            model.sample_many([prompt, prompt[:2], None, prompt], max_length=24, modality_steps=4, cfg_scale=2.0 if i % 2 else 1.0)
        else:
            model.sample(prompt=prompt, max_length=24, modality_steps=4, cfg_scale=2.0 if i % 2 else 1.0)

    for i in range(warmup):
        one(i)
    gc.collect()
    trace = [rss_mib()]
    for i in range(calls):
        one(i)
        if (i + 1) % 10 == 0:
            gc.collect()
            trace.append(rss_mib())
    return {
        "method": "sample_many (4 prompts)" if many else "sample",
        "calls": calls,
        "warmup": warmup,
        "rss_mib_every_10_calls": [round(x, 2) for x in trace],
        "growth_mib": round(trace[-1] - trace[0], 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--many", action="store_true", help="sample_many batches of 4 prompts instead of sample calls")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args.calls, args.warmup, args.many)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
