import copy

import pytest
import torch

from conftest import make_model
from transfusion_pytorch.muon import HIDDEN_MATRICES, Muon, muon_param_groups, orthogonalize


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
def test_orthogonalize_pushes_every_singular_value_near_one_along_the_svd(shape):
    """Against the SVD: the result's singular values lie in the quintic iteration's band
    (~[0.7, 1.2]) although the input's spread over two orders of magnitude, and it points along
    `U Vᵀ` (cosine > 0.95), tall, wide or square."""
    torch.manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    spread = torch.logspace(-2, 0, min(shape))
    matrix = u @ torch.diag(spread) @ vh
    result = orthogonalize(matrix)
    singular = torch.linalg.svdvals(result)
    assert result.shape == matrix.shape and result.dtype == torch.float32
    assert singular.min() > 0.6 and singular.max() < 1.25
    polar = u @ vh
    cosine = (result * polar).sum() / (result.norm() * polar.norm())
    assert cosine > 0.95
    assert torch.linalg.svdvals(matrix).min() < 0.05  # the input was far from orthogonal


def test_orthogonalize_of_a_stack_is_each_matrix_alone():
    """A stack `(n, r, c)` is orthogonalised matrix by matrix — each scaled by its own norm — as
    the optimizer does a shape's matrices at once; matrices of very different norms make a shared
    scaling show."""
    torch.manual_seed(0)
    for shape in [(3, 40, 16), (3, 16, 40)]:
        stack = torch.randn(shape) * torch.tensor([0.01, 1.0, 50.0])[:, None, None]
        together = orthogonalize(stack)
        assert together.shape == stack.shape
        for matrix, result in zip(stack, together):
            assert torch.allclose(result, orthogonalize(matrix), atol=1e-5)


def test_muon_steps_each_matrix_as_if_alone():
    """Matrices of one shape share a batched Newton–Schulz; the result is the step each would get
    from an optimizer of its own (momentum kept per matrix, a shape apart stays apart)."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(shape)) for shape in [(12, 8), (12, 8), (8, 20), (12, 8)]]
    alone = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    together = Muon([{"params": weights, "use_muon": True}], lr=0.02, weight_decay=0.1)
    apart = [Muon([{"params": [w], "use_muon": True}], lr=0.02, weight_decay=0.1) for w in alone]
    for _ in range(3):
        for w, v in zip(weights, alone):
            w.grad = torch.randn_like(w) * torch.rand(())
            v.grad = w.grad.clone()
        together.step()
        for optimizer in apart:
            optimizer.step()
    for w, v in zip(weights, alone):
        assert torch.allclose(w, v, atol=1e-5)


def test_muon_step_matches_the_update_written_out():
    """One matrix, three steps: Nesterov momentum, the orthogonalised update, the RMS-matching
    scale 0.2·sqrt(max(rows, cols)) and decoupled weight decay, against the formula by hand."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(24, 8))
    reference = weight.detach().clone()
    optimizer = Muon([{"params": [weight], "use_muon": True}], lr=0.01, weight_decay=0.1, momentum=0.9)
    buffer = torch.zeros_like(reference)
    for _ in range(3):
        grad = torch.randn(24, 8)
        weight.grad = grad.clone()
        optimizer.step()
        buffer = 0.9 * buffer + grad
        reference = reference * (1 - 0.01 * 0.1) - 0.01 * 0.2 * 24**0.5 * orthogonalize(grad + 0.9 * buffer)
    assert torch.allclose(weight.detach(), reference, atol=1e-6)


def test_the_adamw_groups_step_as_torch_adamw():
    """The parameters outside Muon's groups follow torch's AdamW (decoupled decay, bias
    correction) to float precision over several steps."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 4))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.05, eps=1e-8)
    muon = Muon([{"params": ours, "use_muon": False}], **kwargs)
    adamw = torch.optim.AdamW(theirs, foreach=False, **kwargs)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        muon.step()
        adamw.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=1e-6)
    assert not torch.allclose(ours[0], theirs[0].detach() + 1e-3)  # the check sees a change of that size


def test_muon_param_groups_split_a_transfusion_and_training_resumes_exactly():
    """`muon_param_groups`: the blocks' hidden matrices for Muon, every other parameter for AdamW,
    none twice. Training a model with it lowers the loss, and a run stopped, saved
    (state dicts) and resumed ends on the same weights as one that ran straight through."""
    torch.manual_seed(0)
    model = make_model(dim_latent=8)
    groups = muon_param_groups(model)
    hidden, rest = groups[0]["params"], groups[1]["params"]
    assert len(hidden) == 4 * len(model.transformer.blocks) and all(p.ndim == 2 for p in hidden)
    assert {id(p) for p in hidden}.isdisjoint(id(p) for p in rest)
    assert len(hidden) + len(rest) == len(list(model.parameters()))
    names = {id(p): name for name, p in model.named_parameters()}
    assert all(names[id(p)].endswith(HIDDEN_MATRICES) for p in hidden)

    batch = [[torch.randint(0, 16, (6,)), torch.randn(4, 8)], [torch.randn(3, 8), torch.randint(0, 16, (5,))]]

    def train(model, optimizer, steps, seed):
        torch.manual_seed(seed)
        losses = []
        for _ in range(steps):
            loss = model(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    straight = copy.deepcopy(model)
    optimizer = Muon(muon_param_groups(straight), lr=3e-3)
    losses = train(straight, optimizer, 3, seed=1) + train(straight, optimizer, 3, seed=2)

    halted = copy.deepcopy(model)
    first = Muon(muon_param_groups(halted), lr=3e-3)
    train(halted, first, 3, seed=1)
    resumed_model = copy.deepcopy(model)
    resumed_model.load_state_dict(halted.state_dict())
    resumed = Muon(muon_param_groups(resumed_model), lr=3e-3)
    resumed.load_state_dict(first.state_dict())
    train(resumed_model, resumed, 3, seed=2)

    for p, q in zip(straight.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert losses[-1] < losses[0]


def test_muon_refuses_bad_arguments():
    matrix, vector = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="`params`"):
        Muon([{"params": [vector], "use_muon": True}])
    with pytest.raises(ValueError, match="`lr`"):
        Muon([matrix], lr=-1.0)
    with pytest.raises(ValueError, match="`momentum`"):
        Muon([matrix], momentum=1.0)
    with pytest.raises(ValueError, match="`betas`"):
        Muon([matrix], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="`betas`"):
        Muon([matrix], betas=0.9)
    with pytest.raises(ValueError, match="`ns_steps`"):
        Muon([matrix], ns_steps=0)
    with pytest.raises(TypeError, match="`model`"):
        muon_param_groups(torch.nn.Linear(3, 3))
