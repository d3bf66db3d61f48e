"""One side of `compare_quality.py`: train the MNIST task for a wall-clock budget and sample.

Written only against the public API of transfusion-pytorch 0.12.0 (`Transfusion(...)`,
`model(batch)` for the loss, `model.sample(...)`, `som_ids`, `eos_id`), so the same file runs
with PyPI's 0.12.0 in its own venv and with this repository's package: code written against
0.12 must keep working here, and both sides train exactly the same recipe. It imports
nothing else from this repository (no examples, no judges); the driver hands it the digits
as an .npz and judges what it writes back.

Task: as `train_mnist.py` — a digit's name spelled one letter per token and its 28×28 image
as 49 tokens of 4×4 patches, both orders (`[caption, image]` to generate, `[image, caption]`
to caption) — with each package's default loss (its own flow-time draw), AdamW, a linear
warmup, gradient clipping at 1, fp32.

  python quality_worker.py --data digits.npz --seconds 600 --out result.npz
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from einops import rearrange
from torch import nn

from transfusion_pytorch import Transfusion

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = 26  # text tokens: a..z


def caption(digit: int) -> torch.Tensor:
    return torch.tensor([ord(c) - ord("a") for c in WORDS[digit]])


class Patches(nn.Module):
    """(…, 1, 28, 28) → (…, 16, 7, 7): each 4×4 patch one channel-first latent token."""

    def forward(self, x):
        return rearrange(x, "... c (h p) (w q) -> ... (c p q) h w", p=4, q=4)


class Unpatches(nn.Module):
    def forward(self, x):
        return rearrange(x, "... (c p q) h w -> ... c (h p) (w q)", p=4, q=4, c=1)


def build(args) -> Transfusion:
    return Transfusion(
        num_text_tokens=LETTERS,
        dim_latent=16,
        channel_first_latent=True,
        modality_default_shape=(7, 7),
        modality_encoder=Patches(),
        modality_decoder=Unpatches(),
        add_pos_emb=True,
        transformer=dict(dim=args.dim, depth=args.depth, dim_head=args.dim // args.heads, heads=args.heads),
    )


def first_image(sample) -> torch.Tensor | None:
    for item in sample:
        if isinstance(item, tuple):
            return item[1]
    return None


def written_word(model: Transfusion, sample) -> str:
    """The letters the model wrote after the prompt image, up to [eos] (specials dropped)."""
    texts = [item for item in sample if torch.is_tensor(item) and not item.is_floating_point()]
    if not texts:
        return ""
    letters = []
    for token in texts[-1].tolist():
        if token == model.eos_id:
            break
        if 0 <= token < LETTERS:
            letters.append(chr(ord("a") + token))
    return "".join(letters)


def main(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = np.load(args.data)
    train_images, train_labels = torch.from_numpy(data["train_images"]), torch.from_numpy(data["train_labels"])
    eval_images = torch.from_numpy(data["eval_images"])[: args.captions]

    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))

    model.train()
    losses, step, start = [], 0, time.time()
    while time.time() - start < args.seconds and step < args.max_steps:
        index = torch.randint(0, len(train_labels), (args.batch_size,))
        captioning = (torch.rand(args.batch_size) < args.caption_fraction).tolist()
        batch = []
        for image, label, image_first in zip(train_images[index], train_labels[index].tolist(), captioning):
            batch.append([image, caption(label)] if image_first else [caption(label), image])
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        losses.append(loss.item())
        step += 1
    train_seconds = time.time() - start

    model.eval()
    start = time.time()
    images, words = [], []
    with torch.no_grad():
        for digit in range(10):
            for _ in range(args.per_digit):
                prompt = [torch.cat((caption(digit), torch.tensor([model.som_ids[0]])))]  # the image opens at once
                sample = model.sample(prompt, max_length=49, fixed_modality_shape=(7, 7), modality_steps=args.modality_steps, cache_kv=True)
                image = first_image(sample)
                images.append(torch.zeros(1, 28, 28) - 1 if image is None else image.reshape(1, 28, 28).float())
        for image in eval_images:
            sample = model.sample((0, image), max_length=8, text_temperature=0.0, cache_kv=True)
            words.append(written_word(model, sample))
    sample_seconds = time.time() - start

    np.savez(
        args.out,
        images=torch.stack(images).numpy(),
        losses=np.asarray(losses),
        meta=json.dumps(
            dict(steps=step, train_seconds=train_seconds, sample_seconds=sample_seconds, words=words, parameters=sum(p.numel() for p in model.parameters()))
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=600.0, help="training wall-clock budget")
    parser.add_argument("--max-steps", type=int, default=10**9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--caption-fraction", type=float, default=0.35)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--per-digit", type=int, default=20)
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--modality-steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
