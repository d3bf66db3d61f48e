"""Muon for the transformer's hidden matrices, AdamW for every other parameter, in one optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") replaces a
matrix's momentum update by its nearest semi-orthogonal matrix — all singular values pushed
towards 1 by a few Newton–Schulz iterations — so every direction of the update moves at a
similar rate instead of the few dominant ones. It is meant for the 2-D weights inside the
blocks; embeddings, heads, norms, biases and the time conditioning stay on AdamW. The update is
scaled by `0.2 * sqrt(max(rows, cols))` (Liu et al. 2025, "Muon is Scalable for LLM Training"),
which gives it about AdamW's update size, so AdamW's learning rate and schedule carry over.

The iterations run in fp32: torch's own `torch.optim.Muon` runs them in bf16, which a CPU
without native bf16 emulates (`training.native_amp`) — 137x as slow as fp32 there.

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
    """`(r, c)` → about `U Vᵀ` of its SVD `U S Vᵀ` (every singular value near 1), in fp32, by
    `steps` Newton–Schulz iterations on the matrix scaled to norm 1 (so they start below 1)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix.float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide orientation: the Gram matrix x xᵀ is the smaller square
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T  # (r, r)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


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
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if weight_decay:
                    p.mul_(1 - lr * weight_decay)
                if group["use_muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: Tensor, group: dict):
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buffer, momentum = state["momentum_buffer"], group["momentum"]
        buffer.mul_(momentum).add_(p.grad)
        update = orthogonalize(p.grad.add(buffer, alpha=momentum), group["ns_steps"])  # Nesterov
        p.add_(update.to(p.dtype), alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, p: Tensor, group: dict):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        (beta1, beta2), step = group["betas"], state["step"]
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1**step))
