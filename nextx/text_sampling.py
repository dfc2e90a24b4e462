"""Text decoding for the generator's outer loop (`nextx/generate.py`): sampling one token per row from logits
(greedy, temperature, top-k, top-p) and the per-row bookkeeping (suppressed ids, forced `<boi>`, output segments).

Legend: B rows, V vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def sample_tokens(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> (B,) int64 on CPU. temperature 0: greedy (argmax). Otherwise softmax(logits / temperature)
    restricted to the top_k most likely tokens (0 = all) and to the smallest set whose probability reaches top_p
    (1 = all; the most likely token is always kept), sampled on CPU from `generator`."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1).cpu()
    z = logits / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]                         # (B, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        srt, order = torch.sort(z, dim=-1, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = (cum - torch.softmax(srt, -1)) >= top_p                             # mass before this token >= p
        z = z.scatter(-1, order, srt.masked_fill(drop, float("-inf")))
    probs = torch.softmax(z, -1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def force_sets(force_boi_at: Sequence, B: int) -> list[set[int]]:
    """force_boi_at (indices for every row, or one sequence per row) -> B sets of token indices."""
    per_row = len(force_boi_at) > 0 and not isinstance(force_boi_at[0], (int, np.integer))
    if per_row and len(force_boi_at) != B:
        raise ValueError(f"force_boi_at has {len(force_boi_at)} per-row entries for {B} prompts")
    return [{int(i) for i in force_boi_at[b]} for b in range(B)] if per_row else [{int(i) for i in force_boi_at}] * B


def banned(logits: torch.Tensor, ban: list[int], full: np.ndarray | None, boi: int) -> torch.Tensor:
    """(B, V) logits with the suppressed ids, and `<boi>` in the rows that drew max_images (full (B,) bool), at -inf."""
    if not ban and (full is None or not full.any()):
        return logits
    lg = logits.clone()
    if ban:
        lg[:, ban] = float("-inf")
    if full is not None and full.any():
        lg[torch.from_numpy(full).to(lg.device), boi] = float("-inf")
    return lg


def add_token(row: list, t: int) -> None:
    """Append a text id to a row's output: to its last text segment, or as a new one after an image."""
    if row and isinstance(row[-1], list):
        row[-1].append(t)
    else:
        row.append([t])
