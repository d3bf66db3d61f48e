"""The TYPECHECK switch: shape annotations are enforced with TYPECHECK=1, free otherwise."""

import pytest
import torch

from transfusion_pytorch import _typing
from transfusion_pytorch.attention import RotaryEmbedding
from transfusion_pytorch.flow import default_times_fn


def test_switch_follows_environment(monkeypatch):
    import os

    assert _typing.TYPECHECK == (os.environ.get("TYPECHECK", "").lower() in ("1", "true", "yes"))


def test_annotations_enforced_only_when_on():
    rotary = RotaryEmbedding(8)
    wrong_rank = torch.zeros(5, dtype=torch.long)  # annotated Int['b n']
    float_counts = torch.ones(3)  # annotated Int['b']
    if _typing.TYPECHECK:
        with pytest.raises(TypeError):
            rotary(wrong_rank)
        with pytest.raises(TypeError):
            default_times_fn(float_counts)
    else:
        assert default_times_fn(float_counts.long()).shape == (3, 1)
        assert _typing.typecheck(len) is len
