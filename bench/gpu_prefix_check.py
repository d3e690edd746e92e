"""On one GPU: the CUDA program's prefix-LM attention (FlexAttention block masks) against a dense mask.

    python bench/gpu_prefix_check.py PROGRAM_DIR    # a program compiled for cuda with objective prefix_lm, span_corruption or ul2

On cuda, prefix_lm_mask in the generated model.py builds a FlexAttention block mask from each row's prefix
length (kv <= q or kv < prefix_len[b]); everywhere else the model takes SDPA with the dense (batch, 1, T, T)
bool mask, which the CPU tests check element by element. The CPU tests also run the FlexAttention path eagerly,
forward only (FlexAttention has no CPU backward); only a GPU runs it as the compiled kernel, with its backward.
The reference here is the same model and weights run as the program was before (dense_path): the dense mask, SDPA.
In fp32 (TF32 off), random weights, random rows and prefix lengths (including 0, 1 and the whole row):
  1. eager forward: logits equal the reference's;
  2. torch.compile(model) without gradients (how evaluate() runs): logits equal the eager ones;
  3. the compiled loss model(x, y, prefix_len=...) and its gradients equal the reference's;
  4. speed, bf16 autocast: a compiled training step with the block mask, with the dense mask (the program
     before FlexAttention), and plain causal attention (no prefix).
One JSON line per check on stdout; exit 1 on a mismatch. ``--device cpu`` is a dry run of check 1.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from common import check_setup, grads_of, max_rel_grad_err, median_step_seconds, report, verdict


def dense_mask(prefix_len, T):
    """(batch, 1, T, T) bool, True = may attend: j <= i or j < prefix_len[b] (written here, not taken from model.py)."""
    pos = torch.arange(T, device=prefix_len.device)
    return ((pos[None, :] <= pos[:, None])[None] | (pos[None, None, :] < prefix_len[:, None, None]))[:, None]


@contextmanager
def dense_path(module):
    """The model as the program ran before FlexAttention: prefix_lm_mask builds the dense (batch, 1, T, T) mask and
    attention is SDPA with it."""
    kernel, builder = module.flex_attention, module.prefix_lm_mask

    def sdpa(q, k, v, block_mask=None, enable_gqa=False):  # block_mask: the dense mask, passed where the block mask was
        return F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask, enable_gqa=enable_gqa)

    module.flex_attention, module.prefix_lm_mask = sdpa, dense_mask
    try:
        yield
    finally:
        module.flex_attention, module.prefix_lm_mask = kernel, builder


def main():
    args, plan, module = check_setup(8, "cpu: a dry run of check 1 (FlexAttention eager)")
    assert plan["execution"]["attention"] == "flex" and hasattr(module, "prefix_lm_mask"), "not a prefix program for cuda"
    dev = args.device
    torch.manual_seed(0)
    model = module.Transformer().to(dev)
    vocab, T, B = module.VOCAB_SIZE, plan["batch"]["seq_len"], args.batch
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (B, T), generator=g)
    P = torch.randint(0, T + 1, (B,), generator=g)
    P[:3] = torch.tensor([0, 1, T])  # no prefix, one token, the whole row
    y = torch.randint(0, vocab, (B, T), generator=g)
    y[torch.arange(T)[None, :] < (P[:, None] - 1)] = -100  # no loss inside the prefix, as the objectives' labels
    x, y, P = x.to(dev), y.to(dev), P.to(dev)

    failed = False
    with torch.no_grad():   # 1. eager model, FlexAttention's compiled kernel (on cpu: eager) against the dense mask
        got = model(x, prefix_len=P)
        with dense_path(module):
            ref = model(x, prefix_len=P)
    err = (got - ref).abs().max().item()
    failed |= not verdict("eager logits, block mask == dense mask", err < 2e-4, max_abs_err=err, prefix_lens=P.tolist()[:8])
    if dev == "cpu":
        sys.exit(1 if failed else 0)

    compiled = torch.compile(model)
    with torch.no_grad():   # 2. compiled, no gradients (evaluation)
        cgot = compiled(x, prefix_len=P)
    err = (cgot - got).abs().max().item()
    failed |= not verdict("compiled no-grad logits == eager", err < 2e-4, max_abs_err=err)

    # 3. compiled loss and gradients against the dense mask (eager)
    model.zero_grad(set_to_none=True)
    loss = compiled(x, y, prefix_len=P)
    loss.backward()
    grads = grads_of(model)
    with dense_path(module):
        ref_loss = model(x, y, prefix_len=P)
        ref_loss.backward()
    gerr = max_rel_grad_err(grads, model)
    lerr = abs(loss.item() - ref_loss.item())
    failed |= not verdict("compiled loss and gradients == dense mask", lerr < 1e-4 and gerr < 1e-3, loss=loss.item(),
                          loss_err=lerr, max_rel_grad_err=gerr)

    # 4. speed of a compiled bf16 training step: block mask, dense mask, plain causal
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for name, kw, dense in (("prefix block mask (FlexAttention)", {"prefix_len": P}, False),
                            ("prefix dense mask (SDPA, the program before)", {"prefix_len": P}, True),
                            ("plain causal (SDPA)", {}, False)):
        torch._dynamo.reset()  # the mask builder and kernel are globals a compiled graph captured
        step_model = torch.compile(model)

        def step():
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = step_model(x, y, **kw)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with dense_path(module) if dense else nullcontext():
            t = median_step_seconds(step, args.steps)
        report(check="speed", variant=name, tokens_per_s=round(x.numel() / t), step_ms=round(t * 1e3, 3),
               max_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
        torch.cuda.reset_peak_memory_stats()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
