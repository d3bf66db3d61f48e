"""Multi-resolution training: random batching vs bucketing vs packing, in one run.

Data: N samples `[text (8–128 tokens), image latent (h × w × 16, sides 4–16)]`, generated.
Each strategy trains on the same samples for one pass; strategies alternate over
`--rounds` rounds and the medians are reported:

  padding        padded token slots that carry no sample / all slots (what the batches cost)
  useful tok/s   real (non-padding) tokens trained per second: forward + backward + AdamW

Strategies (B = `--batch-size`, T = the mean padded size of a random batch, so the token
budgets below cost the same memory per step as random batching on average):
  random         shuffled batches of B samples, padded to the longest
  bucket         `BucketBatchSampler(lengths, batch_size=B)`: similar lengths share a batch
  bucket_tokens  `BucketBatchSampler(lengths, max_tokens=T)`: a token budget instead of B
  pack_batch     the random batches, `model(batch, pack=True)`: packed within each batch
  pack_stream    `PackedBatchSampler(lengths, pack_length=P, rows=T // P)`, P the longest
                 sample, `model(batch, pack=P)`: rows packed over windows of many samples

    PYTHONPATH=. .venv/bin/python benchmarks/bench_multires.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from transfusion_pytorch import BucketBatchSampler, PackedBatchSampler, Transfusion
from transfusion_pytorch.data import pack_samples, padding_fraction


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    samples, lengths = [], []
    for _ in range(n):
        text_len = int(torch.randint(8, 129, (1,), generator=g))
        h, w = (int(x) for x in torch.randint(4, 17, (2,), generator=g))
        samples.append([torch.randint(0, 256, (text_len,), generator=g), torch.randn(h, w, 16, generator=g)])
        # sos + text + [meta] "h,w" [som] + h·w + [eom] + eos
        lengths.append(1 + text_len + 1 + len(f"{h},{w}") + 1 + h * w + 1 + 1)
    return samples, lengths


def packed_padding(batches, lengths, pack_length: int | None) -> float:
    """Padding of packed batches as the model packs them: rows padded to the longest row."""
    slots = used = 0
    for batch in batches:
        sub = [lengths[i] for i in batch]
        rows = pack_samples(sub, pack_length or max(sub))
        slots += len(rows) * max(sum(sub[i] for i in row) for row in rows)
        used += sum(sub)
    return 1 - used / slots


def run_epoch(model, optimizer, samples, batches, pack: bool | int) -> float:
    start = time.perf_counter()
    for batch in batches:
        loss = model([samples[i] for i in batch], pack=pack)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def main(args):
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    samples, lengths = make_data(args.samples, args.seed)
    model = Transfusion(
        num_text_tokens=256,
        dim_latent=16,
        add_pos_emb=True,
        modality_default_shape=(8, 8),
        transformer=dict(dim=args.dim, depth=args.depth, dim_head=32, heads=args.dim // 32),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    measured = model.token_lengths(samples)
    assert measured == lengths, "the benchmark's token count disagrees with Transfusion.token_lengths"

    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    random_batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    budget = sum(len(b) * max(lengths[i] for i in b) for b in random_batches) // len(random_batches)
    pack_length = max(lengths)
    plans = {
        "random": (random_batches, False),
        "bucket": (list(BucketBatchSampler(lengths, batch_size=args.batch_size, seed=args.seed)), False),
        "bucket_tokens": (list(BucketBatchSampler(lengths, max_tokens=budget, seed=args.seed)), False),
        "pack_batch": (random_batches, True),
        "pack_stream": (list(PackedBatchSampler(lengths, pack_length=pack_length, rows=max(1, budget // pack_length), seed=args.seed)), pack_length),
    }
    padding = {
        name: padding_fraction(batches, lengths) if pack is False else packed_padding(batches, lengths, None if pack is True else pack)
        for name, (batches, pack) in plans.items()
    }

    run_epoch(model, optimizer, samples, random_batches[:2], False)  # warm-up
    seconds = {name: [] for name in plans}
    for _ in range(args.rounds):
        for name, (batches, pack) in plans.items():
            seconds[name].append(run_epoch(model, optimizer, samples, batches, pack))

    useful = sum(lengths)
    results = {}
    print(
        f"{len(samples)} samples, {useful} real tokens, batch {args.batch_size}, token budget {budget}, pack length {pack_length}, dim {args.dim}, depth {args.depth}, {args.threads} threads"
    )
    print(f"{'strategy':<14} {'batches':>8} {'padding':>8} {'epoch s':>8} {'useful tok/s':>13} {'vs random':>10}")
    base = useful / statistics.median(seconds["random"])
    for name in plans:
        rate = useful / statistics.median(seconds[name])
        batches = len(plans[name][0])
        results[name] = dict(batches=batches, padding=padding[name], epoch_s=statistics.median(seconds[name]), useful_tokens_per_s=rate, speedup=rate / base)
        print(f"{name:<14} {batches:>8} {padding[name]:>8.3f} {statistics.median(seconds[name]):>8.2f} {rate:>13.0f} {rate / base:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), token_budget=budget, pack_length=pack_length, results=results), f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/bench_multires.json")
    main(parser.parse_args())
