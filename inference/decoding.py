"""Token generation loop (baseline; being replaced by the optimised loop)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def prepare_for_decoding(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval()


def sample_next(
    logits: torch.Tensor, previous_ids: torch.Tensor, config, generator=None
) -> int:
    logits = logits.float()
    if config.repetition_penalty != 1.0:
        seen = logits.gather(0, previous_ids)
        seen = torch.where(seen < 0, seen * config.repetition_penalty, seen / config.repetition_penalty)
        logits = logits.scatter(0, previous_ids, seen)
    if not config.do_sample:
        return int(logits.argmax())
    logits = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - config.top_p
        remove[-1] = False
        logits = logits.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_ids(model, prompt_ids, config, eos_token_ids, *, generator=None) -> Iterator[int]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.tensor(prompt_ids, device=device)
    cache = DynamicCache()
    step_input = ids[None]
    position = 0
    for _ in range(config.max_new_tokens):
        n = step_input.shape[1]
        out = model(
            input_ids=step_input,
            position_ids=torch.arange(position, position + n, device=device)[None],
            past_key_values=cache,
            use_cache=True,
        )
        position += n
        token = sample_next(out.logits[0, -1], ids, config, generator)
        if token in eos_token_ids:
            return
        yield token
        ids = torch.cat([ids, torch.tensor([token], device=device)])
        step_input = ids[-1:][None]
