"""Training recipes the example scripts share: the flow-time schedule of modalities in both
orders (generation and captioning) and the learning-rate schedule.

`train_mnist.py` (text ↔ image) and `train_video.py` (text ↔ video) train the same two
tasks in one model, so they draw flow times and learning rates the same way.
"""

from __future__ import annotations

import math

import torch


def flow_times(modality_first: torch.Tensor, caption_min_time: float) -> torch.Tensor:
    """Flow time of each sample's modality, `(b, 1)`; 0 is noise, 1 is clean.

    Generation samples ([caption, modality]) draw t from a logit-normal, which puts more
    training on the middle of the path (Esser et al. 2024, arXiv 2403.03206, found it the
    best schedule for rectified flow). Captioning samples ([modality, caption]) draw t from
    U(caption_min_time, 1): the modality before a caption is never noised beyond that, as the
    Transfusion paper does for image captioning (it caps the noise at half) — the caption
    is learnt from a recognisable input, and sampling captions clean inputs (t = 1).
    """
    generation = torch.sigmoid(torch.randn(modality_first.shape))
    captioning = caption_min_time + (1.0 - caption_min_time) * torch.rand(modality_first.shape)
    return torch.where(modality_first, captioning, generation)[:, None]


def warmup_cosine(warmup: int, total: int, final_fraction: float = 0.1):
    """Linear warmup to the peak lr, then a cosine down to `final_fraction` of it at `total`
    (a `LambdaLR` factor)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
