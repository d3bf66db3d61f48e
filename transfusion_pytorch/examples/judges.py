"""Judges: small classifiers, trained beside the model, that score what it generates.

`DigitClassifier` is a small CNN trained on the MNIST training split of `mnist.py`;
`train_mnist.py` reports the share of generated digits it reads as the prompted digit.
A word classifier for the audio example joins it here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._typing import Float, Int, typecheck


class DigitClassifier(nn.Module):
    """A small CNN for 28×28 digits in [-1, 1]: two conv blocks and a linear head."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14×14
            nn.Conv2d(width, width * 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7×7
            nn.Dropout(0.25),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 2 * 49, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, 10))

    @typecheck
    def forward(self, images: Float["b 1 28 28"]) -> Float["b 10"]:
        return self.head(self.features(images))


def _shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Random translations by up to `max_shift` pixels (background fill), a cheap augmentation."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + 28, dx : dx + 28]
    return out


def train_classifier(
    images: Float["n 1 28 28"],
    labels: Int["n"],
    epochs: int = 6,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> DigitClassifier:
    """Train a `DigitClassifier` (AdamW, one-cycle schedule, ±2 px shifts) on the device of
    `images`; returned there, in eval mode. The batches and shifts are drawn on the CPU from
    `seed`, so they are the same on every device."""
    if labels.device != images.device:
        raise ValueError(f"`labels` must be on the device of `images` ({images.device}), got {labels.device}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # leave the caller's RNG where it was
        torch.manual_seed(seed)
        classifier = DigitClassifier().to(images.device)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = (len(images) + batch_size - 1) // batch_size
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        classifier.train()
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator).to(images.device)
            for start in range(0, len(images), batch_size):
                index = order[start : start + batch_size]
                loss = F.cross_entropy(classifier(_shift(images[index], 2, generator)), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return classifier.eval()


@torch.no_grad()
def classify(classifier: DigitClassifier, images: Float["n 1 28 28"], batch_size: int = 500) -> Int["n"]:
    """Predicted digits `(n,)`, on the classifier's device, for images in [-1, 1] on any device."""
    classifier.eval()
    device = next(classifier.parameters()).device
    return torch.cat([classifier(images[i : i + batch_size].to(device).float().clamp(-1, 1)).argmax(-1) for i in range(0, len(images), batch_size)])
