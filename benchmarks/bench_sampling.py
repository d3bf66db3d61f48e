"""Sampling throughput: `sample` in a loop vs `sample_many`, on the MNIST-sized config.

32 interleaved prompts, text → image as `train_mnist.py` samples them: a caption of 3-5
letters followed by `[meta] "7,7" [som]`, so each sample generates one 7×7 image of 16-wide
latents (49 tokens, `modality_steps` ODE time points, midpoint solver) and then writes text
until `[eos]` or `--max-text` more tokens. The model (dim 256, depth 4, 4 heads) has random
weights: speed does not depend on training, and greedy decoding plus fixed noise make both
paths produce the same samples (checked). The two paths alternate for `--rounds` rounds in
one process; the table reports the median samples/s of each and their ratio.

Run:  .venv/bin/python benchmarks/bench_sampling.py [--rounds 3] [--prompts 32] [--out benchmarks/bench_sampling.json]
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


def prompts_for(model: Transfusion, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    before, _ = model.ids.modality_wrapper(0, (7, 7))
    return [
        torch.cat((torch.randint(0, 26, (int(torch.randint(3, 6, (1,), generator=generator)),), generator=generator), torch.tensor(before)))
        for _ in range(count)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modality-steps", type=int, default=16)
    parser.add_argument("--max-text", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build()
    prompts = prompts_for(model, args.prompts)
    noise = torch.randn(49, 16, generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_length=49 + args.max_text, text_temperature=0.0, init_modality_noise=noise, modality_steps=args.modality_steps)

    def loop():
        return [model.sample(prompt=p, **kwargs) for p in prompts]

    def many():
        return model.sample_many(prompts, **kwargs)

    # the same samples both ways
    for a, b in zip(loop(), many()):
        assert len(a) == len(b) and all(torch.equal(x, y) if torch.is_tensor(x) else torch.allclose(x[1], y[1], atol=1e-3) for x, y in zip(a, b))

    times = {"sample loop": [], "sample_many": []}
    for _ in range(args.rounds):
        for name, fn in (("sample loop", loop), ("sample_many", many)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    result = {
        "prompts": args.prompts,
        "modality_steps": args.modality_steps,
        "threads": args.threads,
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "samples_per_s": {name: round(args.prompts / statistics.median(ts), 2) for name, ts in times.items()},
    }
    result["speedup"] = round(result["samples_per_s"]["sample_many"] / result["samples_per_s"]["sample loop"], 2)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
