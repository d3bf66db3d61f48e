"""Transfusion in PyTorch: one transformer that writes text token by token and generates
continuous modalities by flow matching, in one interleaved sequence (arXiv 2408.11039)."""

from transfusion_pytorch.attention import KVCache
from transfusion_pytorch.data import BucketBatchSampler, PackedBatchSampler, collate_fn, create_dataloader, padding_fraction
from transfusion_pytorch.helpers import print_modality_sample
from transfusion_pytorch.layout import default_to_modality_shape_fn
from transfusion_pytorch.sampling import min_p_filter
from transfusion_pytorch.transformer import Transformer
from transfusion_pytorch.transfusion import LossBreakdown, Transfusion

__all__ = [
    "Transfusion",
    "Transformer",
    "LossBreakdown",
    "KVCache",
    "print_modality_sample",
    "collate_fn",
    "create_dataloader",
    "BucketBatchSampler",
    "PackedBatchSampler",
    "padding_fraction",
    "default_to_modality_shape_fn",
    "min_p_filter",
]

__version__ = "0.13.0"
