"""Image tokenizers: pixels <-> latent tokens (B, N, C) with data std sigma_d (docs/design.md §7).

Two kinds, one interface (`image_size`, `patch_size`, `grid` = (h, w), `token_dim` = C, `encode`, `decode`,
`save`, `load`, `to`), chosen by the `type` in a tokenizer dir's config.json (`load_image_tokenizer`):

    pixel   PixelTokenizer: p x p RGB patches, (B, 3, H, W) -> (B, (H/p)(W/p), 3 p p). No weights.
    kl_ae   AutoencoderTokenizer: the posterior mean of the project's KL autoencoder (nextx.autoencoder),
            (B, 3, H, W) -> (B, (H/f/q)(W/f/q), z q q) with q = latent_patch (default 1).

A tokenizer dir holds config.json (type + shapes), stats.json (the measured per-channel mean and std and the
sigma_d they were scaled to) and, for kl_ae, model.safetensors. Tokens are normalised as

    z = (v - mean_c) / std_c * sigma_d        (v a pixel value or an AE latent, c its channel)

so the measured data has std sigma_d = 0.5, the sigma_d IMM assumes (docs/imm.md §1). The stats are always measured
on data by the jobs in tokenizers/image/ and read from stats.json, never written inline (MAR's
inline 0.2325 is the thing avoided). Per channel, not per token dimension: the stats stay meaningful for
any patch size and a channel's patch values share one scale.

Token layout: patches are taken row-major over the grid; inside a token the values are ordered (channel, row,
column) of the patch, as MAR and DiT's unpatchify do. `patchify`/`unpatchify` are exact inverses.
`pil_to_tensor` is the one place images become tensors (centre crop to square, bicubic resize, [0, 1]).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image as PILImage

from nextx.imm import SIGMA_D

CONFIG_FILE = "config.json"    # {"type": "pixel" | "kl_ae", ...shapes}
STATS_FILE = "stats.json"      # {"mean": [...], "std": [...], "sigma_d": 0.5, ...provenance}
WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Pure helpers


def pil_to_tensor(images: list[PILImage.Image], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) float32 in [0, 1].

    RGB conversion; a non-square image is centre-cropped to its shorter side first (aspect kept, as in ADM/DiT
    preprocessing); then a bicubic resize when the side differs (PIL's resize filters over the whole source
    footprint, so downsizing is antialiased).
    """
    arrays = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        if w != h:
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
        if im.size != (size, size):
            im = im.resize((size, size), PILImage.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrays))                        # (B, size, size, 3) uint8
    return x.permute(0, 3, 1, 2).float().div_(255.0)              # (B, 3, size, size)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p): p x p patches row-major, each flattened (channel, row, col)."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image of {H}x{W} is not divisible into {p}x{p} patches")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)                               # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                               # (B, h, w, C, p, p)
    return x.reshape(B, h * w, C * p * p)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """(B, h*w, C p p) -> (B, C, h p, w p); the exact inverse of `patchify`."""
    B, N, D = tokens.shape
    h, w = grid
    if N != h * w or D % (p * p):
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit grid {grid} with {p}x{p} patches")
    C = D // (p * p)
    x = tokens.reshape(B, h, w, C, p, p)                          # (B, h, w, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)                               # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


class ChannelStats:
    """Running per-channel mean and std over (B, C, ...) tensors, accumulated in float64 (sum, sum of squares)."""

    def __init__(self):
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float64).transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*...)
        s, ss = x.sum(1), x.pow(2).sum(1)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += x.shape[1]

    @property
    def mean(self) -> list[float]:
        if not self.n:
            raise ValueError("no data: ChannelStats saw no values")
        return (self.s / self.n).tolist()

    @property
    def std(self) -> list[float]:
        m = self.s / self.n
        return (self.ss / self.n - m * m).clamp_min(0).sqrt().tolist()


def _check_stats(stats: dict, n_channels: int, where: str) -> None:
    for k in ("mean", "std"):
        v = stats.get(k)
        if not isinstance(v, list) or len(v) != n_channels:
            raise ValueError(f"{where}: '{k}' must be a list of {n_channels} per-channel values, got {v!r}")
    if min(stats["std"]) <= 0:
        raise ValueError(f"{where}: a channel has std {min(stats['std'])} <= 0 (constant data?)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: bad json ({e})") from None


class _Normaliser:
    """Per-channel affine map z = (v - mean) / std * sigma_d over dim 1 of (B, C, ...) tensors."""

    def __init__(self, stats: dict):
        self.stats = dict(stats)
        self.sigma_d = float(stats.get("sigma_d", SIGMA_D))
        self.mean = torch.tensor(stats["mean"], dtype=torch.float32)
        self.std = torch.tensor(stats["std"], dtype=torch.float32)

    def _shaped(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(x.device).view(1, -1, *([1] * (x.ndim - 2)))   # (1, C, 1, ...)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._shaped(self.mean, x)) / self._shaped(self.std, x) * self.sigma_d

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.sigma_d * self._shaped(self.std, z) + self._shaped(self.mean, z)

    def to(self, device) -> None:
        self.mean, self.std = self.mean.to(device), self.std.to(device)


# ---------------------------------------------------------------------------------------------------------
# Pixel patches


class PixelTokenizer:
    """p x p RGB patches, per-channel normalised: (B, 3, H, W) in [0, 1] <-> (B, (H/p)(W/p), 3 p p).

    `stats` = {"mean": [r, g, b], "std": [r, g, b], "sigma_d": 0.5, ...}, measured by `from_pixels` or
    tokenizers/image/pixel_stats.py. Works on the device of its input (the stats follow it).
    """

    type = "pixel"

    def __init__(self, image_size: int, patch_size: int, stats: dict):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        _check_stats(stats, 3, "pixel tokenizer stats")
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.token_dim = 3 * patch_size * patch_size
        self.norm = _Normaliser(stats)

    @classmethod
    def from_pixels(cls, pixels: torch.Tensor | Iterable[torch.Tensor], patch_size: int, *,
                    sigma_d: float = SIGMA_D, **provenance) -> "PixelTokenizer":
        """Measure per-channel stats on pixels (B, 3, H, W) in [0, 1] (or an iterable of such batches)."""
        batches = [pixels] if isinstance(pixels, torch.Tensor) else pixels
        acc = ChannelStats()
        size = None
        for x in batches:
            acc.update(x)
            size = x.shape[-1]
        stats = {"mean": acc.mean, "std": acc.std, "sigma_d": sigma_d, "n_values_per_channel": acc.n, **provenance}
        return cls(int(size), patch_size, stats)

    @property
    def stats(self) -> dict:
        return self.norm.stats

    def to(self, device) -> "PixelTokenizer":
        self.norm.to(device)
        return self

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [0, 1], H = W = image_size -> tokens (B, h*w, 3 p p) float32, std ~ sigma_d."""
        _check_size(pixels, self.image_size)
        return patchify(self.norm(pixels.float()), self.patch_size)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, h*w, 3 p p) -> pixels (B, 3, H, W) float32 clamped to [0, 1]."""
        x = unpatchify(tokens.float(), self.grid, self.patch_size)
        return self.norm.inverse(x).clamp(0, 1)

    def save(self, path: str | os.PathLike) -> None:
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        config = {"type": self.type, "image_size": self.image_size, "patch_size": self.patch_size,
                  "grid": list(self.grid), "token_dim": self.token_dim}
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (d / STATS_FILE).write_text(json.dumps(self.stats, indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PixelTokenizer":
        d = Path(path)
        cfg = _read_json(d / CONFIG_FILE)
        try:
            return cls(int(cfg["image_size"]), int(cfg["patch_size"]), _read_json(d / STATS_FILE))
        except KeyError as e:
            raise ValueError(f"{d / CONFIG_FILE}: missing key {e}") from None


def _check_size(pixels: torch.Tensor, size: int) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != size or pixels.shape[3] != size:
        raise ValueError(f"expected pixels (B, 3, {size}, {size}), got {tuple(pixels.shape)}; "
                         f"resize with nextx.latents.pil_to_tensor(images, {size})")


# ---------------------------------------------------------------------------------------------------------
# KL autoencoder


class AutoencoderTokenizer:
    """Posterior means of a KLAutoencoder, per-channel normalised, optionally q x q patched on the latent map:
    (B, 3, H, W) in [0, 1] <-> (B, (H/f/q)(W/f/q), z q q). Runs on the model's device (`to`); inputs are moved
    there and outputs stay there. `patch_size` is the pixel side of one token, f * q.
    """

    type = "kl_ae"

    def __init__(self, model, stats: dict, latent_patch: int = 1):
        cfg = model.cfg
        if cfg.latent_size % latent_patch:
            raise ValueError(f"latent map {cfg.latent_size} is not divisible by latent_patch {latent_patch}")
        _check_stats(stats, cfg.z_channels, "autoencoder tokenizer stats")
        self.model = model.eval()
        self.latent_patch = latent_patch
        self.image_size = cfg.image_size
        self.patch_size = cfg.downsample * latent_patch
        self.grid = (cfg.latent_size // latent_patch, cfg.latent_size // latent_patch)
        self.token_dim = cfg.z_channels * latent_patch * latent_patch
        self.norm = _Normaliser(stats)

    @property
    def stats(self) -> dict:
        return self.norm.stats

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "AutoencoderTokenizer":
        self.model.to(device)
        self.norm.to(device)
        return self

    @torch.no_grad()
    def latent_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [0, 1] -> unnormalised posterior means (B, z, H/f, W/f) (for measuring stats)."""
        _check_size(pixels, self.image_size)
        p = next(self.model.parameters())
        return self.model.encode(pixels.to(p.device, p.dtype))[0].float()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [0, 1] -> tokens (B, h*w, z q q) float32, std ~ sigma_d on the measured data."""
        return patchify(self.norm(self.latent_map(pixels)), self.latent_patch)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, h*w, z q q) -> pixels (B, 3, H, W) float32 clamped to [0, 1]."""
        p = next(self.model.parameters())
        z = unpatchify(tokens.to(p.device, torch.float32), self.grid, self.latent_patch)   # (B, z, H/f, W/f)
        return self.model.decode(self.norm.inverse(z).to(p.dtype)).float().clamp(0, 1)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        config = {"type": self.type, "image_size": self.image_size, "patch_size": self.patch_size,
                  "grid": list(self.grid), "token_dim": self.token_dim, "latent_patch": self.latent_patch,
                  "weights": WEIGHTS_FILE, "ae": asdict(self.model.cfg)}
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (d / STATS_FILE).write_text(json.dumps(self.stats, indent=2))
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILE))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "AutoencoderTokenizer":
        """From a local dir only (config.json, stats.json, model.safetensors); weights load strictly."""
        from safetensors.torch import load_file

        from nextx.autoencoder import AEConfig, KLAutoencoder

        d = Path(path)
        cfg = _read_json(d / CONFIG_FILE)
        if not isinstance(cfg.get("ae"), dict):
            raise ValueError(f"{d / CONFIG_FILE}: no 'ae' section (the AEConfig the weights were trained with)")
        try:
            ae_cfg = AEConfig(**cfg["ae"])
        except TypeError as e:
            raise ValueError(f"{d / CONFIG_FILE}: bad 'ae' section ({e})") from None
        weights = d / cfg.get("weights", WEIGHTS_FILE)
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: an AE tokenizer dir needs its weights beside config.json")
        model = KLAutoencoder(ae_cfg)
        model.load_state_dict(load_file(str(weights), device=str(device)))
        return cls(model.to(device), _read_json(d / STATS_FILE), int(cfg.get("latent_patch", 1))).to(device)


# ---------------------------------------------------------------------------------------------------------


def load_image_tokenizer(path: str | os.PathLike) -> PixelTokenizer | AutoencoderTokenizer:
    """A tokenizer dir (from `nextx tokenizer pixel` or `nextx tokenizer image`) -> its tokenizer, on CPU."""
    d = Path(path)
    if not str(path):
        raise ValueError("no image tokenizer given (data.image_tokenizer is empty): make one with "
                         "`nextx tokenizer pixel` or `nextx tokenizer image`")
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no image tokenizer at {d}: {d / CONFIG_FILE} not found (make one with "
                                f"`nextx tokenizer pixel` or `nextx tokenizer image`)")
    kind = _read_json(d / CONFIG_FILE).get("type")
    if kind == PixelTokenizer.type:
        return PixelTokenizer.load(d)
    if kind == AutoencoderTokenizer.type:
        return AutoencoderTokenizer.load(d)
    raise ValueError(f"{d / CONFIG_FILE}: unknown image tokenizer type {kind!r} (expected 'pixel' or 'kl_ae')")
