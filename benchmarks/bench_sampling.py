"""Sampling throughput: `sample` in a loop vs `sample_many`, on the MNIST-sized config.

Two workloads of 32 prompts, as `train_mnist.py` samples them:
  text → image: a caption of 3-5 letters followed by `[meta] "7,7" [som]`, so each sample
      generates one 7×7 image of 16-wide latents (49 tokens, `modality_steps` ODE time
      points, midpoint solver), then writes text until `[eos]` or `--max-text` more tokens;
  image → text: a 7×7 image, then up to `--caption-tokens` tokens of text (a caption).
Each is timed four ways, alternating for `--rounds` rounds in one process: `sample` in a
loop and `sample_many`, each eager and with `compile=True` (the one-token decode step under
torch.compile; compiled once before timing). The model (dim 256, depth 4, 4 heads) has
random weights: speed does not depend on training, and greedy decoding plus fixed noise
make every path produce the same samples (checked before timing). Reported: median
samples/s and the speedup over the eager `sample` loop.

Run:  .venv/bin/python benchmarks/bench_sampling.py [--rounds 2] [--prompts 32] [--out benchmarks/bench_sampling.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from transfusion_pytorch import Transfusion


def build(seed: int = 0) -> Transfusion:
    torch.manual_seed(seed)
    return Transfusion(
        num_text_tokens=26,
        dim_latent=16,
        channel_first_latent=False,
        modality_default_shape=(7, 7),
        add_pos_emb=True,
        transformer=dict(dim=256, depth=4, dim_head=64, heads=4),
    ).eval()


def image_prompts(model: Transfusion, count: int) -> list[torch.Tensor]:
    """text → image: a caption of 3-5 letters, then `[meta] "7,7" [som]` (the image opens)."""
    generator = torch.Generator().manual_seed(1)
    before, _ = model.ids.modality_wrapper(0, (7, 7))
    return [
        torch.cat((torch.randint(0, 26, (int(torch.randint(3, 6, (1,), generator=generator)),), generator=generator), torch.tensor(before)))
        for _ in range(count)
    ]


def caption_prompts(model: Transfusion, count: int) -> list:
    """image → text: a 7×7 image, then the model writes its caption."""
    generator = torch.Generator().manual_seed(3)
    return [(0, torch.randn(7, 7, 16, generator=generator)) for _ in range(count)]


def same_samples(first: list, second: list) -> bool:
    return all(
        len(a) == len(b) and all(torch.equal(x, y) if torch.is_tensor(x) else torch.allclose(x[1], y[1], atol=1e-3) for x, y in zip(a, b))
        for a, b in zip(first, second)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modality-steps", type=int, default=16)
    parser.add_argument("--max-text", type=int, default=8, help="text tokens after the image (text → image)")
    parser.add_argument("--caption-tokens", type=int, default=24, help="text budget of a caption (image → text)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build()
    noise = torch.randn(49, 16, generator=torch.Generator().manual_seed(2))
    workloads = {
        "text → image": (image_prompts(model, args.prompts), dict(max_length=49 + args.max_text, init_modality_noise=noise)),
        "image → text": (caption_prompts(model, args.prompts), dict(max_length=args.caption_tokens)),
    }
    result = {"prompts": args.prompts, "modality_steps": args.modality_steps, "threads": args.threads, "rounds": args.rounds, "workloads": {}}

    for workload, (prompts, extra) in workloads.items():
        kwargs = dict(text_temperature=0.0, modality_steps=args.modality_steps, **extra)
        paths = {
            "sample loop": lambda compile=False: [model.sample(prompt=p, compile=compile, **kwargs) for p in prompts],
            "sample_many": lambda compile=False: model.sample_many(prompts, compile=compile, **kwargs),
        }
        # the same samples every way (greedy text, fixed noise); the first compiled calls also compile
        reference = paths["sample loop"]()
        for name, fn in paths.items():
            for compile in (False, True):
                assert same_samples(reference, fn(compile=compile)), (workload, name, compile)
        tokens = sum(sum(x.numel() if torch.is_tensor(x) else 0 for x in sample) for sample in reference)

        times = {f"{name}{' (compiled)' if compile else ''}": [] for name in paths for compile in (False, True)}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                for compile in (False, True):
                    start = time.perf_counter()
                    fn(compile=compile)
                    times[f"{name}{' (compiled)' if compile else ''}"].append(time.perf_counter() - start)
        samples_per_s = {name: round(args.prompts / statistics.median(ts), 3) for name, ts in times.items()}
        loop = samples_per_s["sample loop"]
        result["workloads"][workload] = {
            "text_tokens_in_samples": tokens,
            "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
            "samples_per_s": samples_per_s,
            "speedup_vs_sample_loop": {name: round(v / loop, 2) for name, v in samples_per_s.items()},
        }
        print(json.dumps({workload: result["workloads"][workload]}, indent=2, ensure_ascii=False), flush=True)

    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
