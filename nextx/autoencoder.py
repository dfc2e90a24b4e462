"""A small convolutional KL autoencoder: the project's learned image tokenizer (docs/design.md §7).

    x (B, 3, H, W) in [0, 1] --encoder--> mean, logvar (B, C, H/f, W/f) --z ~ q(z|x)--> decoder --> x_hat (B, 3, H, W)

Choices
- The "first stage" of latent diffusion (Rombach et al. 2022, §3) cut down to what trains on 2 CPU cores in
  minutes at 32-64 px: a conv stem, per level `n_res` ResBlocks (GroupNorm, SiLU, 3x3 conv, twice, plus the
  skip) and a stride-2 3x3 conv down; the decoder mirrors it with nearest upsampling + 3x3 conv. No attention,
  no GAN and no LPIPS (LPIPS needs downloaded VGG weights; docs/design.md §7 allows local weights only).
- Pixels enter as 2x - 1 (zero-centred). The decoder has no squashing output layer: `decode` returns pixel
  values that may leave [0, 1] during training (the loss sees them unclamped, so saturated white or black
  backgrounds still get gradients, which a sigmoid would flatten); the tokenizer clamps (nextx.latents).
- Loss = recon + kl_weight * KL. recon is L1 or L2, a mean over pixels in [0, 1] units; KL(q(z|x) || N(0, I))
  is a mean over latent elements. The KL is a light regulariser: it keeps the posterior noisy (so the decoder
  tolerates small latent errors, which the IMM sampler will make) and the latent scale bounded. Its scale does
  not matter downstream: the tokenizer normalises latents by measured per-channel mean/std.
- `ae_loss` owns the one random draw (the posterior sample), as the objectives do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AEConfig:
    image_size: int = 32                 # side of the square input, pixels
    downsample: int = 4                  # spatial factor f (2, 4, 8 or 16): the latent map is image_size / f
    z_channels: int = 4                  # latent channels C
    channels: int = 32                   # width of the full-resolution level
    channel_mult: tuple[int, ...] = ()   # width multiple per level, log2(f) + 1 entries; () = 1, 2, 4, 4, ...
    n_res: int = 1                       # ResBlocks per level (encoder and decoder each)
    kl_weight: float = 1e-5              # weight of the KL term against the per-pixel recon mean
    recon_loss: str = "l1"               # "l1" or "l2", mean over pixels in [0, 1] units
    logvar_clamp: float = 20.0           # |logvar| bound: keeps exp(logvar) finite early in training

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)  # JSON round trips give lists
        if self.downsample not in (2, 4, 8, 16):
            raise ValueError(f"AEConfig.downsample must be 2, 4, 8 or 16, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"AEConfig.image_size {self.image_size} is not divisible by downsample {self.downsample}")
        if not self.channel_mult:
            self.channel_mult = tuple(min(2 ** i, 4) for i in range(self.levels + 1))
        if len(self.channel_mult) != self.levels + 1:
            raise ValueError(f"AEConfig.channel_mult needs log2(downsample) + 1 = {self.levels + 1} entries, "
                             f"got {self.channel_mult}")
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"AEConfig.recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        if self.z_channels < 1 or self.channels < 1 or self.n_res < 0:
            raise ValueError("AEConfig.z_channels and channels must be >= 1 and n_res >= 0")

    @property
    def levels(self) -> int:
        return int(math.log2(self.downsample))

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def widths(self) -> list[int]:
        return [self.channels * m for m in self.channel_mult]


def _norm(ch: int) -> nn.GroupNorm:
    # 8 groups when the width allows it (GroupNorm needs groups | channels); widths here are small
    groups = math.gcd(ch, 8)
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, 2C, H/f, W/f): mean and logvar stacked on channels."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        w = cfg.widths
        self.stem = nn.Conv2d(3, w[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i in range(cfg.levels):
            self.blocks.append(nn.Sequential(*[ResBlock(w[i], w[i]) for _ in range(cfg.n_res)]))
            self.downs.append(nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1))
        self.mid = ResBlock(w[-1], w[-1])
        self.norm_out = _norm(w[-1])
        self.out = nn.Conv2d(w[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h))                               # (B, w[i+1], H/2^(i+1), W/2^(i+1))
        h = self.mid(h)
        return self.out(F.silu(self.norm_out(h)))           # (B, 2C, H/f, W/f)


class Decoder(nn.Module):
    """(B, C, H/f, W/f) -> (B, 3, H, W) in roughly [-1, 1] (not squashed, see the module docstring)."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        w = cfg.widths
        self.stem = nn.Conv2d(cfg.z_channels, w[-1], 3, padding=1)
        self.mid = ResBlock(w[-1], w[-1])
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i in reversed(range(cfg.levels)):
            self.ups.append(nn.Conv2d(w[i + 1], w[i], 3, padding=1))  # after nearest x2
            self.blocks.append(nn.Sequential(*[ResBlock(w[i], w[i]) for _ in range(cfg.n_res)]))
        self.norm_out = _norm(w[0])
        self.out = nn.Conv2d(w[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.stem(z))
        for up, block in zip(self.ups, self.blocks):
            h = block(up(F.interpolate(h, scale_factor=2.0, mode="nearest")))
        return self.out(F.silu(self.norm_out(h)))           # (B, 3, H, W)


class KLAutoencoder(nn.Module):
    """encode: pixels in [0, 1] -> (mean, logvar); decode: z -> pixels (unclamped). See AEConfig."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [0, 1] -> mean, logvar, each (B, C, H/f, W/f)."""
        h = self.encoder(2 * x - 1)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-self.cfg.logvar_clamp, self.cfg.logvar_clamp)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> pixels (B, 3, h*f, w*f), about [0, 1] but not clamped."""
        return (self.decoder(z) + 1) / 2

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """x (B, 3, H, W) -> (x_hat, mean, logvar); z = mean + exp(logvar / 2) * noise (noise=0: the mean)."""
        mean, logvar = self.encode(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mean, logvar


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element: (mean^2 + var - 1 - logvar) / 2."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def psnr(x_hat: torch.Tensor, x: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,), of images (B, 3, H, W) with pixel range [0, max_val]; mse floored at 1e-10."""
    mse = (x_hat.float() - x.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(max_val ** 2 / mse.clamp_min(1e-10))


def ae_loss(model: KLAutoencoder, x: torch.Tensor, generator: torch.Generator | None = None):
    """x (B, 3, H, W) in [0, 1] -> (loss, parts). Draws the posterior noise itself (seeded by `generator`).

    parts: recon (the L1/L2 mean), kl (mean over latent elements), psnr (mean dB of the clamped recon).
    """
    cfg = model.cfg
    mean, logvar = model.encode(x)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    x_hat = model.decode(mean + torch.exp(0.5 * logvar) * noise)
    err = x_hat - x
    recon = err.abs().mean() if cfg.recon_loss == "l1" else err.pow(2).mean()
    kl = kl_to_standard_normal(mean, logvar).mean()
    loss = recon + cfg.kl_weight * kl
    with torch.no_grad():
        p = psnr(x_hat.clamp(0, 1), x).mean()
    return loss, {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach(), "psnr": p}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
