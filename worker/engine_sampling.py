"""Choosing the next token for every row of a batch: penalties, temperature, top-p, seeds.

Pure tensor functions, no model and no state. Randomness comes in as one uniform number per row,
drawn by the caller from that sequence's own seeded generator, and is turned into a token by
inverse-CDF sampling: so a seeded request gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from worker.engine_text import Found

_NUCLEUS_PREFILTER = 512


def penalty_index(
    histories: Sequence[Mapping[int, int]],
    *,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten per-row token counts into (row, token, count) columns for `apply_penalties`."""
    rows: list[int] = []
    tokens: list[int] = []
    counts: list[float] = []
    for row, history in enumerate(histories):
        rows.extend([row] * len(history))
        tokens.extend(history.keys())
        counts.extend(float(c) for c in history.values())
    return (
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(tokens, dtype=torch.long, device=device),
        torch.tensor(counts, dtype=torch.float32, device=device),
    )


def apply_penalties(
    logits: torch.Tensor,
    index: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """Penalize tokens already generated: HF-style repetition penalty (divide positive logits,
    multiply negative ones) and OpenAI's presence and frequency penalties. Per-row [rows] params;
    `index` from `penalty_index`. Touches only the seen tokens, not the whole vocabulary."""
    rows, tokens, counts = index
    if rows.numel() == 0:
        return logits
    values = logits[rows, tokens]
    rep = repetition[rows]
    values = torch.where(values > 0, values / rep, values * rep)
    values = values - frequency[rows] * counts - presence[rows]
    out = logits.clone()
    out[rows, tokens] = values
    return out


def sample(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """One token id per row. Temperature 0 means greedy; top_p < 1 keeps the smallest set of
    most likely tokens whose probability reaches top_p. `uniform` holds one U[0,1) draw per row."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    temp = torch.where(hot, temperature, torch.ones_like(temperature)).unsqueeze(1)
    probs = torch.softmax(logits / temp, dim=-1)
    chosen = greedy.clone()
    nucleus = hot & (top_p < 1.0)
    plain = hot & ~nucleus
    if bool(plain.any()):
        rows = plain.nonzero(as_tuple=True)[0]
        chosen[rows] = _inverse_cdf(probs[rows], uniform[rows])
    if bool(nucleus.any()):
        rows = nucleus.nonzero(as_tuple=True)[0]
        chosen[rows] = _nucleus(probs[rows], top_p[rows], uniform[rows])
    return chosen


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp(max=probs.shape[-1] - 1)


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    # Sorting the whole vocabulary is slow on CPU; the nucleus almost always lies within the top
    # few hundred tokens, and when their mass reaches top_p for every row the result is exact.
    k = min(probs.shape[-1], _NUCLEUS_PREFILTER)
    sorted_probs, order = probs.topk(k, dim=-1)
    if k < probs.shape[-1] and not bool((sorted_probs.sum(dim=-1) >= top_p).all()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the strictly more likely tokens
    kept = torch.where(before < top_p.unsqueeze(1), sorted_probs, torch.zeros_like(sorted_probs))
    kept[:, 0] = sorted_probs[:, 0]  # the most likely token always survives
    position = _inverse_cdf(kept, uniform)
    return order.gather(1, position.unsqueeze(1)).squeeze(1)


def token_logprobs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    chosen: torch.Tensor,
    rows: Sequence[int],
    tops: Sequence[int],
) -> dict[int, Found]:
    """Log probabilities of the chosen tokens of `rows`, and each row's `tops[i]` most likely
    tokens, most likely first.

    They are taken from the distribution the token was sampled from: the logits after penalties
    and any grammar mask, divided by the temperature. At temperature 0 (greedy) there is no such
    distribution, so they are the model's own (temperature 1) after penalties and mask. Top-p
    truncation is not applied (as OpenAI reports them). Only `rows` are computed: a request that
    did not ask pays nothing.
    """
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    temp = temperature.index_select(0, index)
    temp = torch.where(temp > 0, temp, torch.ones_like(temp)).unsqueeze(1)
    logp = torch.log_softmax(logits.index_select(0, index) / temp, dim=-1)
    picked = logp.gather(1, chosen.index_select(0, index).unsqueeze(1)).squeeze(1).tolist()
    k = max(tops)
    top_values, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
    values, ids = top_values.tolist(), top_ids.tolist()
    out: dict[int, Found] = {}
    for j, row in enumerate(rows):
        n = tops[j]
        top = [(int(t), float(v)) for t, v in zip(ids[j][:n], values[j][:n]) if v != float("-inf")]
        out[row] = (int(chosen[row]), float(picked[j]), top)
    return out
