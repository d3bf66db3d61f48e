"""Muon for the transformer's hidden matrices, AdamW for every other parameter, in one optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") replaces a
matrix's momentum update by its nearest semi-orthogonal matrix — all singular values pushed
towards 1 by a few Newton–Schulz iterations — so every direction of the update moves at a
similar rate instead of the few dominant ones. It is meant for the 2-D weights inside the
blocks; embeddings, heads, norms, biases and the time conditioning stay on AdamW. The update is
scaled by `0.2 * sqrt(max(rows, cols))` (Liu et al. 2025, "Muon is Scalable for LLM Training"),
which gives it about AdamW's update size, so AdamW's learning rate and schedule carry over.

The iterations run in fp32: torch's own `torch.optim.Muon` runs them in bf16, which a CPU
without native bf16 emulates (`training.native_amp`) — 137x as slow as fp32 there. The matrices of
one shape (each block has the same four) are orthogonalised as one batch, and the AdamW half runs
as `torch._foreach_*` ops over its parameters: on the video example's model the step went from 58
to 37 ms, nearly all of it the Newton–Schulz products themselves.

    from transfusion_pytorch.muon import Muon, muon_param_groups
    optimizer = Muon(muon_param_groups(model), lr=2e-3, betas=(0.9, 0.99))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .inputs import check_float, check_int

# the quintic iteration's coefficients (Jordan et al. 2024): they push singular values of
# [0, 1] into roughly [0.7, 1.2] in 5 steps, faster than the cubic that converges exactly to 1
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# the matrices of each block that Muon updates (attention in / out, feed-forward in / out)
HIDDEN_MATRICES = ("attn.to_qkv.weight", "attn.to_out.weight", "ff.proj_in.weight", "ff.proj_out.weight")


def orthogonalize(matrix: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """`(r, c)`, or a stack `(n, r, c)`, → about `U Vᵀ` of each matrix's SVD `U S Vᵀ` (every singular
    value near 1), in fp32, by `steps` Newton–Schulz iterations on each matrix scaled to norm 1 (so they
    start below 1). A stack runs as batched products: the optimizer orthogonalises a shape's matrices at once."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix.float()
    single = x.ndim == 2
    if single:
        x = x[None]
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: the Gram matrix x xᵀ is the smaller square
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT  # (n, r, r)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G²) x
    x = x.mT if tall else x
    return x[0] if single else x


def muon_param_groups(model: nn.Module) -> list[dict]:
    """Two parameter groups of a `Transfusion` (or its `Transformer`): the blocks' hidden matrices
    (`HIDDEN_MATRICES`) for Muon, every other parameter for AdamW. Frozen ones are listed too (a
    parameter without a gradient is not stepped), so the groups, and a checkpoint's optimizer state,
    do not depend on what was frozen when the optimizer was made (a fitted autoencoder)."""
    transformer = getattr(model, "transformer", model)
    if not hasattr(transformer, "blocks"):
        raise TypeError(f"`model` must be a Transfusion or its Transformer, got {type(model).__name__}")
    hidden = [p for name, p in transformer.blocks.named_parameters() if name.endswith(HIDDEN_MATRICES)]
    chosen = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}]


class Muon(torch.optim.Optimizer):
    """Muon on the groups with `use_muon=True` (2-D parameters only), AdamW on the others.

    lr, weight_decay: shared (per group if given there); weight decay is decoupled in both.
    momentum: Muon's (Nesterov) momentum. betas, eps: AdamW's. ns_steps: Newton–Schulz iterations.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        eps: float = 1e-8,
        ns_steps: int = 5,
    ):
        check_float("lr", lr, 0.0)
        check_float("weight_decay", weight_decay, 0.0)
        check_float("momentum", momentum, 0.0, 0.999)
        check_float("eps", eps, 1e-30)
        check_int("ns_steps", ns_steps, 1)
        if not (isinstance(betas, tuple | list) and len(betas) == 2):
            raise TypeError(f"`betas` must be a pair of floats, got {betas!r}")
        for beta in betas:
            check_float("betas", beta, 0.0, 0.999999)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, momentum=momentum, eps=eps, ns_steps=ns_steps, use_muon=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"`params`: Muon updates matrices only, got a parameter of shape {tuple(p.shape)} in a `use_muon` group")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            (self._muon if group["use_muon"] else self._adamw)(params, group)
        return loss

    def _muon(self, params: list[Tensor], group: dict):
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, grads)
        nesterov = torch._foreach_add(grads, buffers, alpha=group["momentum"])
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for shape, indices in by_shape.items():  # one batched Newton–Schulz per shape (a block's matrices repeat)
            updates = orthogonalize(torch.stack([nesterov[i] for i in indices]), group["ns_steps"])
            chosen = [params[i] for i in indices]
            torch._foreach_add_(chosen, list(updates.to(chosen[0].dtype).unbind(0)), alpha=-group["lr"] * 0.2 * math.sqrt(max(shape)))

    def _adamw(self, params: list[Tensor], group: dict):
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for state, p in zip(states, params):
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        (beta1, beta2), eps = group["betas"], group["eps"]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, [-group["lr"] / (1 - beta1 ** s["step"]) for s in states])
