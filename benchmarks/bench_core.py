"""CPU micro-benchmark of the core Transfusion calls.

Measures whichever `transfusion_pytorch` the running interpreter imports, using only the
0.12-compatible API, so the same script runs on this repo and on PyPI's 0.12.0:

  train_step_s   median seconds of forward + backward + AdamW step + zero_grad on a batch
                 of 8 interleaved samples [64 text tokens, 8x8x16 latent, 16 text tokens]
                 (3 warmup steps, then --steps timed steps)
  text128_s      median seconds of `generate_text_only` extending a (8, 16) prompt by
                 128 tokens (1 warmup, then --gen-repeats timed runs)
  text128_b1_s   the same at batch 1 after a 1-token prompt (overhead-bound: one token's
                 forward per step)
  text128_compiled_s, text128_b1_compiled_s
                 (this repo only: `generate_text_only(..., compile=True)`) the same two with
                 the decode step under torch.compile; the warmup run includes the compile
  modality8_s    median seconds of `generate_modality_only(batch_size=8, modality_steps=16)`
                 (1 warmup, then 3 timed runs)
  peak_rss_mib   peak resident set size of the process (ru_maxrss) after the calls above,
                 before the compiled rows (compiling takes memory of its own)

Model: Transfusion(num_text_tokens=256, dim_latent=16, modality_default_shape=(8, 8),
transformer=dict(dim=256, depth=4, heads=8, dim_head=32)), fp32, fixed seed.

Run (ours):     PYTHONPATH=. .venv/bin/python benchmarks/bench_core.py --json /tmp/ours.json
Run (upstream): /tmp/transfusion-0.12-venv/bin/python benchmarks/bench_core.py  (from a dir
                that does not contain the repo's package)
A call that raises is recorded as an error string for its metric instead of a number.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback

os.environ.setdefault("TQDM_DISABLE", "1")  # 0.12 wraps generation loops in tqdm

import torch

import transfusion_pytorch
from transfusion_pytorch import Transfusion

try:  # 0.12 logs through loguru
    from loguru import logger

    logger.remove()
except ImportError:
    pass


def package_version() -> str:
    version = getattr(transfusion_pytorch, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("transfusion-pytorch")
        except Exception:
            version = "unknown"
    return version


def median_time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, results: dict, fn, warmup: int, repeats: int) -> None:
    """Time `fn`; on an exception store its message under `name` instead of a number."""
    try:
        results[name] = median_time(fn, warmup, repeats)
    except Exception as err:
        traceback.print_exc()
        results[name] = f"error: {type(err).__name__}: {err}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gen-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as a JSON dict")
    parser.add_argument("--amp-compare", action="store_true", help="(this repo only) also time the training step under bf16 autocast, alternating with fp32")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = Transfusion(
        num_text_tokens=256,
        dim_latent=16,
        modality_default_shape=(8, 8),
        transformer=dict(dim=256, depth=4, heads=8, dim_head=32),
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = [[torch.randint(0, 256, (64,)), torch.randn(8, 8, 16), torch.randint(0, 256, (16,))] for _ in range(8)]
    prompt = torch.randint(0, 256, (8, 16))

    def train_step():
        model.train()
        loss = model(batch)
        loss.backward()
        optim.step()
        optim.zero_grad()

    results: dict = {}
    measure("train_step_s", results, train_step, warmup=3, repeats=args.steps)

    if args.amp_compare:  # bf16 vs fp32 training step, alternating in one run
        from transfusion_pytorch.training import make_precision

        bf16 = make_precision(use_amp=True, amp_dtype="bf16")

        def bf16_step():
            with bf16.autocast():
                loss = model(batch)
            bf16.step(loss, optim, model.parameters())

        fp32_times, bf16_times = [], []
        for _ in range(args.steps // 2):
            fp32_times.append(median_time(train_step, 0, 1))
            bf16_times.append(median_time(bf16_step, 1, 1))
        results["train_step_fp32_s"] = statistics.median(fp32_times)
        results["train_step_bf16_s"] = statistics.median(bf16_times)
        results["bf16_speedup"] = results["train_step_fp32_s"] / results["train_step_bf16_s"]
    measure("text128_s", results, lambda: model.generate_text_only(prompt, 16 + 128, temperature=1.0), warmup=1, repeats=args.gen_repeats)
    prompt_b1 = prompt[:1, :1]
    measure("text128_b1_s", results, lambda: model.generate_text_only(prompt_b1, 1 + 128, temperature=1.0), warmup=1, repeats=args.gen_repeats)
    measure("modality8_s", results, lambda: model.generate_modality_only(batch_size=8, modality_steps=16), warmup=1, repeats=3)

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results["peak_rss_mib"] = maxrss / (1024 * 1024 if platform.system() == "Darwin" else 1024)  # bytes on macOS, KiB on Linux
    if "compile" in inspect.signature(model.generate_text_only).parameters:
        for name, p in (("text128_compiled_s", prompt), ("text128_b1_compiled_s", prompt_b1)):
            measure(name, results, lambda p=p: model.generate_text_only(p, p.shape[1] + 128, temperature=1.0, compile=True), warmup=1, repeats=args.gen_repeats)
    results["package_version"] = package_version()
    results["torch_version"] = torch.__version__

    print(
        f"transfusion_pytorch {results['package_version']} ({os.path.dirname(transfusion_pytorch.__file__)}), torch {torch.__version__}, {args.threads} threads"
    )
    keys = (
        "train_step_s",
        "train_step_fp32_s",
        "train_step_bf16_s",
        "bf16_speedup",
        "text128_s",
        "text128_b1_s",
        "text128_compiled_s",
        "text128_b1_compiled_s",
    )
    for key in (*keys, "modality8_s", "peak_rss_mib"):
        if key not in results:
            continue
        value = results[key]
        print(f"  {key:<22} {value:10.4f}" if isinstance(value, float) else f"  {key:<22} {value}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
