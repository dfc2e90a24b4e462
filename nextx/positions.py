"""Position encodings, pure: RoPE frequencies (with Llama-3 scaling), the multimodal RoPE sections and their
in-image frequency ladder, cos/sin tables and their application, and the fixed 2D sin-cos table (docs/design.md §3).

Legend: B rows, L tokens, h heads, hd head dim, P = hd/2 rotary pairs.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """(P,) fp32 inverse frequencies theta^(-2i/hd) of the P = hd/2 rotary pairs, with optional Llama-3 scaling.

    Llama-3 ("llama3") scaling keeps wavelengths shorter than ctx/high_freq_factor, divides those longer than
    ctx/low_freq_factor by `factor`, and interpolates linearly in ctx/wavelength in between (Llama 3.1 report)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind != "llama3":
        raise ValueError(f"RoPE scaling {kind!r} is not implemented (supported: none/default, llama3)")
    factor, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = ((ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)    # 0: long wavelength (scaled), 1: short (kept)
    return (1 - smooth) * inv / factor + smooth * inv


def rope_section(n_pairs: int) -> torch.Tensor:
    """(P,) int section of each rotary pair for multimodal RoPE: 0 temporal (1D), 1 row, 2 col (see docstring)."""
    i = torch.arange(n_pairs)
    return torch.where(i % 4 == 1, 1, torch.where(i % 4 == 3, 2, 0))


def rope2d_inv_freq(inv_freq: torch.Tensor, section: torch.Tensor, own: bool) -> torch.Tensor:
    """(P,) frequencies that turn the in-image (row, col) offsets of multimodal RoPE.

    own=False: the 1D ladder's own frequency at each pair ("shared"). own=True: the j-th row pair and the j-th
    col pair both get 2^-j (j = 0, 1, ...: wavelengths 2 pi, 4 pi, ... cells), so both axes see the same ladder,
    from neighbouring cells (1 - cos 1 = 0.46 apart) to beyond any grid. Temporal pairs are unchanged."""
    if not own:
        return inv_freq
    j = torch.cumsum((section == 1).long(), 0) - 1                      # rank of each row pair among row pairs
    j = torch.where(section == 2, torch.cumsum((section == 2).long(), 0) - 1, j)
    return torch.where(section > 0, torch.exp2(-j.to(inv_freq.dtype)), inv_freq)


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, offsets: torch.Tensor | None = None,
                 offset_freq: torch.Tensor | None = None):
    """pos (B, L) int -> cos, sin (B, 1, L, hd) fp32 in the rotate-half layout (angle i at i and i + P).

    offsets (B, L, P) int, optional: per-pair position offsets (multimodal RoPE row/col sections), turned by
    offset_freq (P,) (default: inv_freq), so angle_i = pos inv_freq_i + offset_i offset_freq_i."""
    ang = pos.float()[..., None] * inv_freq.float()                      # (B, L, P)
    if offsets is not None:
        of = inv_freq if offset_freq is None else offset_freq
        ang = ang + offsets.float() * of.float()                         # (B, L, P)
    emb = torch.cat([ang, ang], dim=-1)[:, None]                         # (B, 1, L, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, L, hd): pairs (x_i, x_{i+P}) rotated by angle i (HF Llama's rotate_half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


def sincos_2d(pos2d: torch.Tensor, dim: int) -> torch.Tensor:
    """(…, 2) int (row, col) -> (…, dim) fp32: [sin(row w), cos(row w), sin(col w), cos(col w)],
    w_j = 1e4^(-j / (dim/4)). Computed from the positions, so any image size works (no table to outgrow)."""
    q = dim // 4
    w = torch.exp(-math.log(1e4) * torch.arange(q, dtype=torch.float64, device=pos2d.device) / q)
    r = pos2d[..., 0:1].double() * w
    c = pos2d[..., 1:2].double() * w
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=-1).float()
