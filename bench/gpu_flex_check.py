"""On one GPU: the CUDA program's document masks (FlexAttention) against running each document alone.

    python bench/gpu_flex_check.py PROGRAM_DIR      # a program compiled for cuda with data.packing document/best_fit

The CPU tests check this for the CPU path (SDPA with an explicit block-diagonal mask) and, forward only
and eagerly, for FlexAttention; only a GPU runs FlexAttention as the compiled kernel, with its backward.
In fp32 (TF32 off) on a random model and random packed rows:
  1. eager forward: each document's logits in a packed row equal the document run alone (causal SDPA);
  2. torch.compile(model): the packed logits equal the eager ones;
  3. the compiled loss model(x, y, doc_ids=...) and its gradients equal the loss of the documents run
     alone (cross-entropy over the same targets) and its gradients;
  4. speed, bf16 autocast: a compiled training step on packed rows against the same rows without
     document masks (plain causal attention). One JSON line per check on stdout; exit 1 on a mismatch.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from common import check_setup, grads_of, max_rel_grad_err, median_step_seconds, report, verdict


def packed_rows(batch, seq_len, vocab, eos, seed):
    """Rows of whole random documents (token ids below eos; lengths 1..seq_len/2, each ending with eos), with ids."""
    g = torch.Generator().manual_seed(seed)
    xs, ids, spans = [], [], []
    for _ in range(batch):
        toks, doc, row_spans, at, k = [], [], [], 0, 0
        while at < seq_len:
            n = min(int(torch.randint(1, seq_len // 2, (1,), generator=g)), seq_len - at)
            d = torch.randint(0, eos, (n,), generator=g)
            d[-1] = eos
            toks.append(d)
            doc.append(torch.full((n,), k))
            row_spans.append((at, at + n))
            at, k = at + n, k + 1
        xs.append(torch.cat(toks))
        ids.append(torch.cat(doc))
        spans.append(row_spans)
    return torch.stack(xs), torch.stack(ids), spans


def main():
    args, plan, module = check_setup(4, "cpu: a dry run of the script (FlexAttention eager, no backward)")
    dev = args.device
    torch.manual_seed(0)
    model = module.Transformer().to(dev)
    vocab, seq_len = module.VOCAB_SIZE, plan["batch"]["seq_len"]
    x, ids, spans = packed_rows(args.batch, seq_len, vocab, eos=vocab - 1, seed=1)
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -100
    x, ids, y = x.to(dev), ids.to(dev), y.to(dev)
    failed = False

    with torch.no_grad():   # 1. eager: FlexAttention (its compiled kernel) against each document alone
        packed = model(x, doc_ids=ids)
        alone = torch.cat([torch.cat([model(x[r:r + 1, a:b])[0] for a, b in spans[r]])[None] for r in range(len(spans))])
        err = (packed - alone).abs().max().item()
        plain = model(x)
        leak = (plain - packed).abs().max().item()
    failed |= not verdict("eager packed logits == documents alone", err < 2e-4 and leak > 1e-2, max_abs_err=err,
                          without_masks_differs_by=leak, documents=sum(map(len, spans)))

    compiled = torch.compile(model)
    with torch.no_grad():   # 2. compiled model
        cpacked = compiled(x, doc_ids=ids)
    err = (cpacked - packed).abs().max().item()
    failed |= not verdict("compiled packed logits == eager", err < 2e-4, max_abs_err=err)

    # 3. compiled loss and gradients against the documents run alone
    model.zero_grad(set_to_none=True)
    loss = compiled(x, y, doc_ids=ids)
    loss.backward()
    got = grads_of(model)
    logits = torch.cat([torch.cat([model(x[r:r + 1, a:b])[0] for a, b in spans[r]])[None] for r in range(len(spans))])
    ref = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)
    ref.backward()
    gerr = max_rel_grad_err(got, model)
    lerr = abs(loss.item() - ref.item())
    failed |= not verdict("compiled loss and gradients == documents alone", lerr < 1e-4 and gerr < 1e-3, loss=loss.item(),
                          loss_err=lerr, max_rel_grad_err=gerr)

    # 4. speed of a compiled bf16 training step with and without document masks
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for name, kw in (("document masks (FlexAttention)", {"doc_ids": ids}), ("plain causal (SDPA)", {})):
        def step():
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = compiled(x, y, **kw)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = median_step_seconds(step, args.steps, cuda=dev == "cuda")
        report(check="speed", variant=name, tokens_per_s=round(x.numel() / t), step_ms=round(t * 1e3, 3))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
