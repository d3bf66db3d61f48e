"""Masked attention on CPU: SDPA's fused kernel against explicit scores (`Attention.attend_reference`,
scores and softmax in fp32) and, for bf16 inputs, against the fused kernel on fp32 copies of them
(`upcast`, the output cast back), forward + backward and forward only, bf16 and fp32, over
sequence lengths. It is the measurement behind `attention.upcast_is_faster` (which path bf16
training on CPU takes).

Run:  .venv/bin/python benchmarks/bench_attention.py [--threads 2] [--json benchmarks/bench_attention.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transfusion_pytorch.attention import UPCAST_MAX_KEYS, Attention, AttentionMask

# (batch, heads, tokens, dim_head): train_video.py's step, train_mnist.py's step, then longer rows
SHAPES = ((32, 4, 84, 32), (64, 4, 60, 64), (16, 4, 128, 64), (8, 4, 256, 64), (4, 4, 512, 64), (2, 4, 1024, 64))


def milliseconds(fn, rounds: int) -> float:
    """The fastest of `rounds` timings of 5 calls each, per call."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(5):
            fn()
        best = min(best, (time.perf_counter() - start) / 5)
    return best * 1e3


def measure(shape: tuple[int, int, int, int], dtype: torch.dtype, rounds: int) -> dict:
    b, h, n, dh = shape
    attention = Attention(dim=h * dh, dim_head=dh, heads=h)
    q, k, v = (torch.randn(b, h, n, dh, dtype=dtype, requires_grad=True) for _ in range(3))
    dense = (torch.rand(b, 1, n, n) > 0.3) | torch.eye(n, dtype=torch.bool)  # every query sees itself
    mask = AttentionMask(dense=dense)

    def fused():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    def explicit():
        return attention.attend_reference(q, k, v, mask, dropout_p=0.0)

    def upcast():
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense).to(dtype)

    row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
    paths = (("fused", fused), ("explicit", explicit)) + ((("upcast", upcast),) if dtype != torch.float32 else ())
    for name, fn in paths:
        row[f"{name}_train_ms"] = round(milliseconds(lambda fn=fn: fn().sum().backward(), rounds), 2)
        with torch.no_grad():
            row[f"{name}_forward_ms"] = round(milliseconds(fn, rounds), 2)
    row["train_speedup"] = round(row["fused_train_ms"] / row["explicit_train_ms"], 2)
    row["forward_speedup"] = round(row["fused_forward_ms"] / row["explicit_forward_ms"], 2)
    if "upcast_train_ms" in row:
        row["upcast_train_speedup"] = round(row["fused_train_ms"] / row["upcast_train_ms"], 2)
        row["upcast_forward_speedup"] = round(row["fused_forward_ms"] / row["upcast_forward_ms"], 2)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the first shape, one round (a smoke run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for name in ("threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = [measure(shape, dtype, 1 if args.quick else args.rounds) for dtype in (torch.bfloat16, torch.float32) for shape in shapes]
    print(f"{'(b, h, n, dh)':>20} {'dtype':>9} {'train ms: fused / explicit / upcast':>36} {'forward ms: fused / explicit / upcast':>38}")
    for row in rows:
        train = " / ".join(f"{row[f'{name}_train_ms']:.2f}" if f"{name}_train_ms" in row else "-" for name in ("fused", "explicit", "upcast"))
        forward = " / ".join(f"{row[f'{name}_forward_ms']:.2f}" if f"{name}_forward_ms" in row else "-" for name in ("fused", "explicit", "upcast"))
        print(f"{str(tuple(row['shape'])):>20} {row['dtype']:>9} {train:>36} {forward:>38}")
    if args.json:
        report = {
            "command": f"benchmarks/bench_attention.py --threads {args.threads} --rounds {args.rounds}" + (" --quick" if args.quick else ""),
            "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
            "upcast_max_keys": UPCAST_MAX_KEYS,
            "rows": rows,
        }
        path = Path(args.json)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(path)


if __name__ == "__main__":
    main()
