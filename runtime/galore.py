"""GaLore: AdamW on gradients projected onto a low-rank subspace (Zhao et al. 2024, "GaLore: Memory-Efficient
LLM Training by Gradient Low-Rank Projection", Algorithm 1).

For a weight matrix W (m × n) with gradient G, every ``update_every`` steps the projector P is recomputed
from G's singular vectors (the top ``rank`` right singular vectors when m >= n, else the left ones, each with
a fixed sign; see ``_projector``); in between it is kept. Adam's moments live in the projected space (m × r or r × n instead of m × n, which is
the memory GaLore saves), the normalised update is projected back and scaled by ``scale`` (the paper's α),
and weight decay is decoupled as in AdamW. Parameter groups without ``rank`` are plain AdamW.

Each optimizer state entry is a tensor (``step``, ``exp_avg``, ``exp_avg_sq``, ``projector``), so
checkpoints save and restore it like AdamW's and a resumed run continues exactly.
"""

from __future__ import annotations

import torch


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      rank=None, update_every=200, scale=0.25))

    @staticmethod
    def _right(shape) -> bool:
        """Project on the right (G @ P, P: n × r) when the matrix is at least as tall as it is wide."""
        return shape[0] >= shape[1]

    @torch.no_grad()
    def _projector(self, grad: torch.Tensor, rank: int) -> torch.Tensor:
        """The top ``rank`` singular vectors of the gradient: n × r on the right, m × r on the left, in at least fp32.

        They are the eigenvectors of the smaller Gram matrix (GᵀG on the right, GGᵀ on the left) with the
        largest eigenvalues: ``torch.linalg.eigh`` of a 768 × 768 matrix takes 3-5× less time than the SVD
        of a 768 × 2048 gradient on a CPU (docs/performance.md), and a GPU's SVD is slower still. The Gram
        matrix squares G's condition number, which costs the top ``rank`` vectors nothing while their singular
        values stay above about 1e-3 of the largest (fp32). Each vector's sign is fixed, its entry of largest
        magnitude positive, so the projectors of similar subspaces at successive refreshes agree and the
        moments carried across a refresh keep their meaning (an SVD's signs are arbitrary).
        """
        g = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        gram = g.t() @ g if self._right(g.shape) else g @ g.t()
        top = torch.linalg.eigh(gram).eigenvectors[:, -rank:].flip(-1)  # eigenvalues ascend: the largest first
        signs = top.gather(0, top.abs().argmax(dim=0, keepdim=True)).sign()
        return (top * torch.where(signs == 0, 1.0, signs)).contiguous()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            rank = group.get("rank")
            params, grads, avgs, sqs, steps, back = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                proj = None
                if rank is not None and grad.dim() == 2:
                    right = self._right(grad.shape)
                    if int(state["step"]) % group["update_every"] == 0:  # a new subspace from this step's gradient
                        state["projector"] = self._projector(grad, min(rank, *grad.shape)).to(grad.dtype)
                    proj = state["projector"]
                    grad = grad @ proj if right else proj.t() @ grad     # m × r or r × n
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(grad)
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
                steps.append(int(state["step"]))
                back.append(None if proj is None else (proj, right))
            if not params:
                continue
            # Adam's moments and normalised update, over all of the group's tensors at once (torch._foreach_*: on a GPU
            # a few multi-tensor kernels instead of a dozen small ones per parameter)
            torch._foreach_lerp_(avgs, grads, 1 - beta1)
            torch._foreach_mul_(sqs, beta2)
            torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
            first = torch._foreach_div(avgs, [1 - beta1 ** t for t in steps])
            second = torch._foreach_div(sqs, [1 - beta2 ** t for t in steps])
            torch._foreach_sqrt_(second)
            torch._foreach_add_(second, group["eps"])
            updates = torch._foreach_div(first, second)
            del first, second
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            for p, update, b in zip(params, updates, back):
                if b is not None:  # a projected update back to m × n, × α: one matrix at a time, so that the step
                    proj, right = b  # never holds more than one full-size update (GaLore's point is memory)
                    update = (update @ proj.t() if right else proj @ update).mul_(group["scale"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss
