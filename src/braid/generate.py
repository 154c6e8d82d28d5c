"""Text generation with a KV cache: prefill the prompt once, then decode one token at a time.

Sampling: temperature (0 = greedy), then top-k, then top-p (nucleus) filtering of the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.errors import BraidError
from braid.model.transformer import Transformer


def filter_logits(logits_BV: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Mask (to -inf) logits outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = logits_BV.sort(dim=-1, descending=True)
        cum = sorted_l.softmax(-1).cumsum(-1)
        drop = cum - sorted_l.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits_BV = logits_BV.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits_BV


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, prompt_len: int, ctx_len: int
) -> None:
    """Refuse sampling settings that would silently mean something else (one line each)."""
    if not max_new_tokens >= 1:
        raise BraidError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    if not temperature >= 0 or temperature == float("inf"):
        raise BraidError(f"--temperature {temperature}: must be a finite number >= 0 (0 is greedy)")
    if top_k < 0:
        raise BraidError(f"--top-k {top_k}: must be >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise BraidError(f"--top-p {top_p}: must be in (0, 1] (1 keeps every token)")
    if prompt_len + max_new_tokens > ctx_len:
        raise BraidError(
            f"the prompt ({prompt_len} tokens) plus --max-new-tokens "
            f"{max_new_tokens} exceed the model's context of {ctx_len} tokens "
            f"(model.max_seq_len): ask for at most {max(ctx_len - prompt_len, 0)} "
            "new tokens or shorten the prompt"
        )


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_BT: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> Tensor:
    """Continue `prompt_BT`; returns [B, T + new] tokens (stops early when all hit stop_token)."""
    model.eval()
    B, T = prompt_BT.shape
    check_sampling(max_new_tokens, temperature, top_k, top_p, T, model.cfg.max_seq_len)
    caches = model.new_caches(B, T + max_new_tokens)
    logits = model(prompt_BT, caches=caches, start_pos=0).logits[:, -1]
    out, done = [prompt_BT], torch.zeros(B, dtype=torch.bool, device=prompt_BT.device)
    for i in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(nxt)
        if stop_token is not None:
            done |= nxt.squeeze(1) == stop_token
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits = model(nxt, caches=caches, start_pos=T + i).logits[:, -1]
    return torch.cat(out, dim=1)
