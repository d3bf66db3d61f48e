import pytest
import torch

from transfusion_pytorch import Transfusion


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_transformer(**kwargs):
    return dict(dim=32, depth=2, dim_head=8, heads=4, **kwargs)


def make_model(**kwargs) -> Transfusion:
    kwargs.setdefault("num_text_tokens", 16)
    kwargs.setdefault("transformer", tiny_transformer())
    return Transfusion(**kwargs)


def gpu_available() -> bool:
    return torch.cuda.is_available()
