"""Sampling a continuation from a model (the end of a run, and `malt sample`)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int, device: str = "cpu", seed: int = 0,
             temperature: float = 0.8, top_k: int = 50, start_id: int | None = None) -> str:
    """Prompt plus up to ``max_new_tokens`` sampled tokens (top-k, temperature), as text. An empty prompt starts
    from ``start_id`` (the end-of-text token that precedes every document: a new document), not shown."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids  # as the training data was encoded: no BOS
    hidden = 0 if ids else 1
    ids = ids or [start_id if start_id is not None else 0]
    max_len = model.rope_cos.shape[0]
    vocab = tokenizer.get_vocab_size()
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        # eagerly: the blocks of a program compiled under FSDP2 are compiled in place, and every new length would
        # compile them again
        with torch.compiler.set_stance("force_eager"):
            logits = model(tokens[:, -max_len:])[0, -1].float().cpu()
        logits = logits[:vocab]  # never sample the padding rows of the vocabulary
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, vocab)).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=device)], dim=1)
    if was_training:
        model.train()
    return tokenizer.decode(tokens[0, hidden:].tolist(), skip_special_tokens=False)
