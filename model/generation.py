"""Autoregressive generation with a KV cache: greedy, or temperature with nucleus (top-p)."""

from __future__ import annotations

from collections.abc import Collection

import torch

from model.kv_cache import KVCache
from model.transformer import Transformer


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Pick the next token from last-position logits (vocab,)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = cumulative - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(sorted_idx[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Collection[int] = (),
    seed: int | None = None,
) -> list[int]:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens; stops early at any of
    `stop_ids` (EOS, and e.g. Llama-3's <|eot_id|>), which is kept as the last token."""
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt")
    max_len = model.config.max_seq_len
    prompt_ids = prompt_ids[-(max_len - 1) :]
    max_new_tokens = min(max_new_tokens, max_len - len(prompt_ids))
    param = next(model.parameters())
    generator = None
    if seed is not None:
        generator = torch.Generator(device=param.device)
        generator.manual_seed(seed)
    cache = KVCache(
        model.config.n_layers,
        1,
        model.config.kv_heads,
        len(prompt_ids) + max_new_tokens,
        model.config.head_dim,
        param.dtype,
        param.device,
    )
    was_training = model.training
    model.eval()
    tokens = torch.tensor([prompt_ids], device=param.device)
    logits = model(tokens, kv_cache=cache, start_pos=0)[0, -1]
    position = len(prompt_ids)
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        next_id = sample_next(logits, temperature, top_p, generator)
        new_tokens.append(next_id)
        if next_id in stop_ids or position >= cache.max_len:
            break
        step = torch.tensor([[next_id]], device=param.device)
        logits = model(step, kv_cache=cache, start_pos=position)[0, -1]
        position += 1
    model.train(was_training)
    return new_tokens
