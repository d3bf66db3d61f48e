"""Sampling throughput: `sample` in a loop vs `sample_many`, on the MNIST-sized config.

Two workloads of 32 prompts, as `train_mnist.py` samples them:
  text → image: a caption of 3-5 letters followed by `[meta] "7,7" [som]`, so each sample
      generates one 7×7 image of 16-wide latents (49 tokens, `modality_steps` ODE time
      points, midpoint solver), then writes text until `[eos]` or `--max-text` more tokens;
  image → text: a 7×7 image, then up to `--caption-tokens` tokens of text (a caption).
Each is timed four ways, alternating for `--rounds` rounds in one process: `sample` in a
loop and `sample_many`, each eager and with `compile=True` (the one-token decode step and the
ODE step under torch.compile, `decoding.py` / `ode_step.py`; compiled before timing). The model (dim 256, depth 4, 4 heads) has
random weights: speed does not depend on training, and greedy decoding plus fixed noise
make every path produce the same samples (checked before timing). Reported: median
samples/s and the speedup over the eager `sample` loop.

`--precision fp32 bf16` (the default: both) times every path in fp32 and under bf16 autocast
(as `train_mnist.py` samples during evaluation where bf16 is native, its default there). Under bf16 a batch of
32 rows and one row round differently, so greedy paths may part ways: the check then reports,
for each path against the fp32 `sample` loop and against the bf16 one, the share of samples
with the same text and the largest difference of their images (among those), and requires at
least 90 % of samples to have the same text as the fp32 loop.

Run:  .venv/bin/python benchmarks/bench_sampling.py [--rounds 2] [--prompts 32] [--precision fp32 bf16] [--out benchmarks/bench_sampling.json]
"""

from __future__ import annotations

import argparse
import contextlib
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


def agreement(reference: list, other: list) -> dict:
    """Share of samples whose text equals the reference's, and the largest image difference among them."""
    same_text, image_diff = 0, 0.0
    for a, b in zip(reference, other):
        texts = [x for x in a if torch.is_tensor(x)], [x for x in b if torch.is_tensor(x)]
        if len(a) == len(b) and len(texts[0]) == len(texts[1]) and all(torch.equal(x, y) for x, y in zip(*texts)):
            same_text += 1
            for x, y in zip(a, b):
                if not torch.is_tensor(x):
                    image_diff = max(image_diff, (x[1].float() - y[1].float()).abs().max().item())
    return {"same_text": round(same_text / len(reference), 3), "max_image_diff": round(image_diff, 4)}


def precision_context(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modality-steps", type=int, default=16)
    parser.add_argument("--max-text", type=int, default=8, help="text tokens after the image (text → image)")
    parser.add_argument("--caption-tokens", type=int, default=24, help="text budget of a caption (image → text)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"], help="fp32, and / or bf16 autocast")
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
        reference = paths["sample loop"]()  # fp32
        tokens = sum(sum(x.numel() if torch.is_tensor(x) else 0 for x in sample) for sample in reference)
        for precision in args.precision:
            key = workload if precision == "fp32" else f"{workload}, bf16 autocast"
            checks, bf16_reference = {}, None
            with precision_context(precision):
                # the same samples every way (greedy text, fixed noise); the first compiled calls also compile
                for name, fn in paths.items():
                    for compile in (False, True):
                        samples = fn(compile=compile)
                        if precision == "fp32":
                            assert same_samples(reference, samples), (workload, name, compile)
                        else:  # against the fp32 loop, and against the bf16 loop (the first path)
                            bf16_reference = bf16_reference if name != "sample loop" or compile else samples
                            check = {"vs fp32 loop": agreement(reference, samples), "vs bf16 loop": agreement(bf16_reference, samples)}
                            checks[f"{name}{' (compiled)' if compile else ''}"] = check
                            assert check["vs fp32 loop"]["same_text"] >= 0.9, (workload, name, compile, check)

                times = {f"{name}{' (compiled)' if compile else ''}": [] for name in paths for compile in (False, True)}
                for _ in range(args.rounds):
                    for name, fn in paths.items():
                        for compile in (False, True):
                            start = time.perf_counter()
                            fn(compile=compile)
                            times[f"{name}{' (compiled)' if compile else ''}"].append(time.perf_counter() - start)
            samples_per_s = {name: round(args.prompts / statistics.median(ts), 3) for name, ts in times.items()}
            loop = samples_per_s["sample loop"]
            result["workloads"][key] = {
                "precision": precision,
                "text_tokens_in_samples": tokens,
                "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
                "samples_per_s": samples_per_s,
                "speedup_vs_sample_loop": {name: round(v / loop, 2) for name, v in samples_per_s.items()},
                **({"agreement": checks} if checks else {}),
            }
            print(json.dumps({key: result["workloads"][key]}, indent=2, ensure_ascii=False), flush=True)

    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
