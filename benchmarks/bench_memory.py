"""Activation checkpointing: activation memory and step time, with and without.

Config: dim 512, depth 8, heads 8, dim_head 64; one sample of 2,048 tokens
(text + one 32 × 32 latent + text), fp32, forward + backward.

Activation memory is measured two ways, each mode in a fresh process:
  saved MiB   bytes of the tensors autograd keeps for backward, counted by a
              `saved_tensors_hooks` around the forward (what checkpointing removes:
              inside a checkpointed block nothing is kept but the block's input)
  peak MiB    the process's peak RSS during forward + backward minus its RSS just
              before (Linux: VmHWM after resetting it through /proc/self/clear_refs)
Step time is the median of `--steps` forward + backward passes.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(use_checkpoint: bool, steps: int, threads: int) -> dict:
    import torch

    from transfusion_pytorch import Transfusion

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = Transfusion(
        num_text_tokens=256,
        dim_latent=16,
        modality_default_shape=(32, 32),
        transformer=dict(dim=512, depth=8, heads=8, dim_head=64, use_checkpoint=use_checkpoint),
    )
    text = 2048 - 1024 - 9  # sos, [meta] "32,32" [som], [eom], eos around the 1,024 latent tokens
    batch = [[torch.randint(0, 256, (text // 2,)), torch.randn(32, 32, 16), torch.randint(0, 256, (text - text // 2,))]]
    times = torch.rand(1, 1)

    model(batch, times=times).backward()  # warm-up: allocator, gradients exist from here on

    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch, times=times)
    loss.backward()

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    before = rss_kib("VmRSS:")
    model(batch, times=times).backward()
    peak = rss_kib("VmHWM:")

    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        model(batch, times=times).backward()
        durations.append(time.perf_counter() - start)
    return dict(saved_mib=saved / 2**20, peak_mib=(peak - before) / 1024, step_s=statistics.median(durations))


def main(args):
    if args.child is not None:
        print(json.dumps(measure(args.child == "on", args.steps, args.threads)))
        return
    results = {}
    for mode in ("off", "on"):
        # a fixed mmap threshold makes glibc return freed activations to the OS, so RSS follows them
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        command = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    off, on = results["off"], results["on"]
    summary = dict(
        saved_reduction=1 - on["saved_mib"] / off["saved_mib"],
        peak_reduction=1 - on["peak_mib"] / off["peak_mib"],
        step_time_ratio=on["step_s"] / off["step_s"],
    )
    print(f"{'checkpointing':<14} {'saved MiB':>10} {'peak MiB':>10} {'step s':>8}")
    for mode in ("off", "on"):
        r = results[mode]
        print(f"{mode:<14} {r['saved_mib']:>10.0f} {r['peak_mib']:>10.0f} {r['step_s']:>8.2f}")
    print(
        f"saved-tensor memory -{summary['saved_reduction']:.0%}, peak activation memory -{summary['peak_reduction']:.0%}, step time x{summary['step_time_ratio']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, summary=summary), f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["on", "off"], default=None)
    parser.add_argument("--json", default="benchmarks/bench_memory.json")
    main(parser.parse_args())
