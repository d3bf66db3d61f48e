import pytest
import torch

from transfusion_pytorch import Transfusion


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """A fixed seed, and one thread: the tests' tiny models run fastest on one (a shared 2-core
    machine runs them tens of times slower with two)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_transformer(**kwargs):
    return dict(dim=32, depth=2, dim_head=8, heads=4, **kwargs)


def make_model(**kwargs) -> Transfusion:
    kwargs.setdefault("num_text_tokens", 16)
    kwargs.setdefault("transformer", tiny_transformer())
    return Transfusion(**kwargs)


def gpu_available() -> bool:
    return torch.cuda.is_available()


def randomized(model, std: float = 0.2):
    """The model with noise added to every parameter: zero-initialised layers (the time
    conditioning, gates) come alive, so the output depends on time, prefix and weights, and an
    equivalence test on it could fail."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model
