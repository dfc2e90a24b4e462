"""Image tokenizers (nextx.latents), the KL autoencoder (nextx.autoencoder) and their jobs, on CPU at tiny sizes."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from nextx.autoencoder import AEConfig, KLAutoencoder, ae_loss, psnr
from nextx.documents import Document, Image, Text, decode_document, iter_raw_samples, shard_paths, write_shards
from nextx.latents import (AutoencoderTokenizer, PixelTokenizer, load_image_tokenizer, patchify, pil_to_tensor,
                           unpatchify)

REPO = Path(__file__).resolve().parents[1]


def _job(rel: str):
    """main() of a job under tokenizers/, loaded by path as `nextx` does (that folder is not a package)."""
    return runpy.run_path(str(REPO / rel), run_name="nextx_job")["main"]


def _blobs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: coloured rectangles on a light background (structured, not noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, size, size), 0.9)
    for i in range(n):
        a, b = torch.randint(0, size // 2, (2,), generator=g).tolist()
        x[i, :, a:a + size // 2, b:b + size // 3] = torch.rand(3, 1, 1, generator=g)
    return x


def _pil(x: torch.Tensor) -> PILImage.Image:
    return PILImage.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _shards(root: Path, n: int, size: int, splits=("train",)) -> Path:
    for k, split in enumerate(splits):
        docs = [Document(f"{split}{i:03d}", [Text(f"blob {i}"), Image(_pil(x))], {"i": i})
                for i, x in enumerate(_blobs(n, size, seed=k))]
        write_shards(docs, root, split=split, max_per_shard=7, progress=False, info={"generator": "test"})
    return root


# ---------------------------------------------------------------------------------------------------------
# patches and pixels


@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 4), ((1, 4, 8, 16), 2), ((3, 3, 6, 6), 1)])
def test_patchify_unpatchify_exact(shape, p):
    x = torch.randn(shape)
    t = patchify(x, p)
    B, C, H, W = shape
    assert t.shape == (B, (H // p) * (W // p), C * p * p)
    assert torch.equal(unpatchify(t, (H // p, W // p), p), x)


def test_patchify_layout_row_major_channel_first():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # C=2, H=4, W=6, p=2 -> grid 2x3
    t = patchify(x, 2)
    # token 1 = grid (row 0, col 1): pixels rows 0-1, cols 2-3, ordered (channel, row, col)
    assert torch.equal(t[0, 1], x[0, :, 0:2, 2:4].reshape(-1))
    assert torch.equal(t[0, 3], x[0, :, 2:4, 0:2].reshape(-1))  # token 3 = (row 1, col 0)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 3, 5, 5), 2)


def test_pil_to_tensor_converts_crops_and_resizes():
    rgba = PILImage.new("RGBA", (40, 20), (255, 0, 0, 255))
    grey = PILImage.new("L", (16, 16), 128)
    x = pil_to_tensor([rgba, grey], 16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x[0, 0], torch.ones(16, 16)) and torch.allclose(x[1], torch.full((3, 16, 16), 128 / 255))
    # an image already at the size is not resampled: bytes come back exactly
    arr = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert torch.equal(pil_to_tensor([PILImage.fromarray(arr)], 8)[0], torch.from_numpy(arr).permute(2, 0, 1) / 255)


# ---------------------------------------------------------------------------------------------------------
# pixel tokenizer


def test_pixel_tokenizer_roundtrip_std_and_save_load(tmp_path):
    x = _blobs(16, 32)
    tok = PixelTokenizer.from_pixels(x, 4, source="test")
    assert (tok.image_size, tok.patch_size, tok.grid, tok.token_dim) == (32, 4, (8, 8), 48)
    z = tok.encode(x)
    assert z.shape == (16, 64, 48)
    per_channel = z.view(16, 64, 3, 16).transpose(0, 2).reshape(3, -1)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.full((3,), 0.5), atol=1e-4)
    assert abs(z.mean().item()) < 1e-4
    assert torch.allclose(tok.decode(z), x, atol=1e-6)
    tok.save(tmp_path / "pix")
    stats = json.loads((tmp_path / "pix" / "stats.json").read_text())
    assert stats["source"] == "test" and np.allclose(stats["mean"], x.mean((0, 2, 3)).tolist(), atol=1e-6)
    back = load_image_tokenizer(tmp_path / "pix")
    assert isinstance(back, PixelTokenizer) and torch.equal(back.encode(x), z)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tok.encode(torch.zeros(1, 3, 16, 16))


def test_load_image_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_image_tokenizer(tmp_path / "nope")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"type": "vqgan"}')
    with pytest.raises(ValueError, match="vqgan"):
        load_image_tokenizer(tmp_path / "odd")
    with pytest.raises(ValueError, match="empty"):
        load_image_tokenizer("")
    (tmp_path / "ae").mkdir()
    (tmp_path / "ae" / "config.json").write_text('{"type": "kl_ae", "ae": {"image_size": 32}}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_image_tokenizer(tmp_path / "ae")


# ---------------------------------------------------------------------------------------------------------
# autoencoder


@pytest.mark.parametrize("size,f", [(32, 2), (32, 4), (64, 4), (64, 8)])
def test_ae_shapes(size, f):
    cfg = AEConfig(image_size=size, downsample=f, z_channels=3, channels=8)
    ae = KLAutoencoder(cfg)
    x = torch.rand(2, 3, size, size)
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 3, size // f, size // f)
    x_hat, _, _ = ae(x)
    assert x_hat.shape == x.shape


def test_ae_config_checks():
    with pytest.raises(ValueError, match="downsample"):
        AEConfig(downsample=3)
    with pytest.raises(ValueError, match="channel_mult"):
        AEConfig(downsample=4, channel_mult=(1, 2))
    assert AEConfig(downsample=8).channel_mult == (1, 2, 4, 4)


def test_psnr_known_value():
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x + 0.1, x).item() == pytest.approx(20.0, abs=1e-4)  # mse 0.01 -> 20 dB


def test_ae_training_smoke_lowers_loss():
    torch.manual_seed(0)
    ae = KLAutoencoder(AEConfig(image_size=32, downsample=4, z_channels=4, channels=8))
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    x, g = _blobs(8, 32), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        loss, parts = ae_loss(ae, x, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert set(parts) == {"loss", "recon", "kl", "psnr"}
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_autoencoder_tokenizer_save_load_identical(tmp_path):
    torch.manual_seed(0)
    ae = KLAutoencoder(AEConfig(image_size=32, downsample=4, z_channels=4, channels=8))
    x = _blobs(6, 32)
    with torch.no_grad():
        mu = ae.encode(x)[0]
    stats = {"mean": mu.mean((0, 2, 3)).tolist(), "std": mu.std((0, 2, 3), unbiased=False).tolist(), "sigma_d": 0.5}
    tok = AutoencoderTokenizer(ae, stats)
    assert (tok.grid, tok.token_dim, tok.patch_size) == ((8, 8), 4, 4)
    z = tok.encode(x)
    assert z.shape == (6, 64, 4) and z.std(unbiased=False).item() == pytest.approx(0.5, abs=1e-3)
    rec = tok.decode(z)
    assert rec.shape == x.shape and 0 <= rec.min() and rec.max() <= 1
    tok.save(tmp_path / "ae")
    back = load_image_tokenizer(tmp_path / "ae")
    assert isinstance(back, AutoencoderTokenizer)
    assert torch.equal(back.encode(x), z) and torch.equal(back.decode(z), rec)
    patched = AutoencoderTokenizer(ae, stats, latent_patch=2)
    zp = patched.encode(x)
    assert zp.shape == (6, 16, 16) and torch.equal(patched.decode(zp), rec)


# ---------------------------------------------------------------------------------------------------------
# jobs


def test_pixel_stats_job_by_path(tmp_path):
    shards = _shards(tmp_path / "shards", 12, 32)
    out = tmp_path / "pix"
    r = subprocess.run([sys.executable, str(REPO / "tokenizers/image/pixel_stats.py"), "--shards", str(shards),
                        "--out", str(out), "--image-size", "16", "--patch-size", "4"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "latent std after normalisation 0.5000" in r.stdout
    tok = load_image_tokenizer(out)
    assert (tok.image_size, tok.grid, tok.stats["n_images"]) == (16, (4, 4), 12)


def test_encode_latents_job(tmp_path):
    from data_tools.encode_latents import main as encode_main

    shards = _shards(tmp_path / "shards", 10, 32, splits=("train", "heldout"))
    (shards / "train-000099.tar").write_bytes(b"not a tar at all" * 40)  # unreadable: counted, not fatal
    x = pil_to_tensor([_pil(im) for im in _blobs(10, 32)], 32)
    PixelTokenizer.from_pixels(x, 8).save(tmp_path / "pix")
    out = tmp_path / "enc"
    assert encode_main(["--shards", str(shards), "--split", "all", "--tokenizer", str(tmp_path / "pix"),
                        "--out", str(out), "--batch-size", "4"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert set(info["splits"]) == {"train", "heldout"} and info["generator"] == "test"
    assert info["latents"]["grid"] == [4, 4] and info["latents"]["token_dim"] == 192
    tok = load_image_tokenizer(tmp_path / "pix")
    docs = [decode_document(s) for s in iter_raw_samples(shard_paths(out, "train"))]
    assert [d.key for d in docs] == [f"train{i:03d}" for i in range(10)] and docs[3].meta == {"i": 3}
    lat = docs[3].images[0].latents
    assert lat.shape == (16, 192) and lat.dtype == np.float16
    want = tok.encode(pil_to_tensor([docs[3].images[0].pixels], 32))[0].numpy()
    assert np.allclose(lat.astype(np.float32), want, atol=2e-3)
    assert encode_main(["--shards", str(shards), "--tokenizer", str(tmp_path / "pix"), "--out", str(shards)]) == 2


def test_train_ae_job_smoke_with_fallback_heldout(tmp_path):
    shards = _shards(tmp_path / "shards", 20, 32)  # no heldout split: the job holds out train images
    out = tmp_path / "ae"
    rc = _job("tokenizers/image/train_ae.py")(["--shards", str(shards), "--out", str(out), "--image-size", "32",
                                               "--downsample", "4", "--channels", "8", "--steps", "3",
                                               "--batch-size", "4", "--warmup", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["heldout"]["source"].startswith("fallback") and report["heldout"]["n_images"] == 2
    assert report["train"]["steps"] == 3 and report["train"]["n_images"] == 18
    assert {"psnr_ae_db", "psnr_bilinear_db"} <= set(report["heldout"])
    assert (out / "recon.png").is_file()
    tok = load_image_tokenizer(out)
    assert isinstance(tok, AutoencoderTokenizer) and tok.encode(torch.rand(1, 3, 32, 32)).shape == (1, 64, 4)
