"""CLIP alignment with open_clip: CLIPScore, caption similarity and retrieval recall, any architecture, local weights.

    clip = Clip.load("local-dir:runs/clip")                       # a dir with open_clip_config.json + weights
    clip = Clip.load("ViT-B-32", pretrained="/models/vitb32.bin")  # a registered architecture + a local file
    s = clip.score(images, prompts)                               # (n,) CLIPScore = 100 * max(cos, 0)
    r = retrieval_recall(clip.images(images), clip.texts(prompts)) # text->image and image->text recall@1/5
    fd = frechet_distance(clip, real_images, generated_images)     # FD in the CLIP's image features

CLIPScore follows Hessel et al. (2021): 100 · max(cos(image, text), 0) per (image, text) pair (their w = 2.5 scaling is
left out, as torchmetrics does). Nothing is downloaded: weights come from a local file or folder, and a missing one is
an error that says how to make one (`nextx clip train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from nextx.errors import UserError

LOCAL_DIR = "local-dir:"


class ClipWeightsMissing(UserError, FileNotFoundError):
    """No local CLIP weights where the user pointed (nextx never downloads)."""


def _no_weights(where: str) -> FileNotFoundError:
    return ClipWeightsMissing(
        f"no CLIP weights at {where}. nextx never downloads: give a local open_clip checkpoint (an architecture name "
        f"and --clip-pretrained FILE), or a folder with open_clip_config.json and its weights, e.g. one made by "
        f"`nextx clip train --shards DIR --out DIR`")


@dataclass
class Clip:
    """An open_clip model in eval mode with its image preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    device: torch.device

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, device: str = "cpu") -> "Clip":
        """name: an open_clip architecture (with `pretrained` a local weights file), or `local-dir:DIR` / a folder
        holding open_clip_config.json and weights (`nextx clip train` writes one)."""
        import open_clip

        if not name.startswith(LOCAL_DIR) and Path(name).is_dir():
            name = LOCAL_DIR + name
        if name.startswith(LOCAL_DIR):
            d = Path(name[len(LOCAL_DIR):])
            has_weights = any(d.glob("*.safetensors")) or any(d.glob("*.bin"))
            if not (d / "open_clip_config.json").is_file() or not has_weights:
                raise _no_weights(str(d))
            pretrained = None
        elif pretrained is None or not Path(pretrained).is_file():
            raise _no_weights(str(pretrained))
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        return cls(model.eval(), preprocess, open_clip.get_tokenizer(name), torch.device(device))

    @torch.no_grad()
    def images(self, images: Sequence, batch: int = 64) -> torch.Tensor:
        """PIL images -> (n, E) L2-normalised image embeddings (float32, CPU)."""
        out = []
        for i in range(0, len(images), batch):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + batch]]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    @torch.no_grad()
    def texts(self, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
        """Strings -> (n, E) L2-normalised text embeddings (float32, CPU)."""
        out = []
        for i in range(0, len(texts), batch):
            tok = self.tokenizer(list(texts[i:i + batch])).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tok).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def score(self, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
        """CLIPScore of each (image, text) pair: (n,) = 100 * max(cos, 0)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts: CLIPScore scores pairs")
        return clip_score(self.images(images), self.texts(texts))


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(n, E), (n, E) normalised embeddings of pairs -> (n,) 100 * max(cos, 0)."""
    return 100.0 * (image_emb * text_emb).sum(-1).clamp(min=0)


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Row i of each is a matching pair. -> {"t2i@k": share of texts whose image ranks in the top k among all images,
    "i2t@k": the same for images, "chance@k": k / n}."""
    n = len(image_emb)
    sim = text_emb @ image_emb.T                                              # (n texts, n images)
    target = torch.arange(n)
    out = {}
    for k in ks:
        kk = min(k, n)
        out[f"t2i@{k}"] = float((sim.topk(kk, dim=1).indices == target[:, None]).any(1).float().mean())
        out[f"i2t@{k}"] = float((sim.T.topk(kk, dim=1).indices == target[:, None]).any(1).float().mean())
        out[f"chance@{k}"] = kk / n
    return out


def preference_rate(clip: Clip, images: Sequence, true_texts: Sequence[str], changed: Sequence[str]) -> float:
    """Share of images whose true caption scores above the same caption with one fact changed."""
    img = clip.images(images)
    return float(((img * clip.texts(true_texts)).sum(-1) > (img * clip.texts(changed)).sum(-1)).float().mean())


FACT_CHANGES = ("colour", "shape", "position", "count")


def change_one_fact(caption: str, fact: str, rng) -> str | None:
    """A shapes caption with one fact changed (data_tools.shapes grammar), or None when the fact is absent: colour or
    shape of the first object to another value; position of the first object that states one to another cell;
    count: one object fewer (the last), or one more for a single-object caption (a copy of it in another colour)."""
    from dataclasses import replace

    from data_tools.shapes import CELLS, PALETTE, SHAPES, Caption, format_caption, parse_caption

    c = parse_caption(caption)
    nps = list(c.nps)
    if fact == "colour":
        nps[0] = replace(nps[0], colour=rng.choice([k for k in PALETTE if k != nps[0].colour]))
    elif fact == "shape":
        nps[0] = replace(nps[0], shape=rng.choice([k for k in SHAPES if k != nps[0].shape]))
    elif fact == "position":
        at = [i for i, n in enumerate(nps) if n.cell]
        if not at:
            return None
        nps[at[0]] = replace(nps[at[0]], cell=rng.choice([k for k in CELLS if k != nps[at[0]].cell]))
    elif fact == "count":
        if len(nps) > 1:
            return format_caption(Caption(tuple(nps[:-1])))
        other = replace(nps[0], colour=rng.choice([k for k in PALETTE if k != nps[0].colour]), cell=None)
        return format_caption(Caption((nps[0], other)))
    else:
        raise ValueError(f"fact must be one of {FACT_CHANGES}, got {fact!r}")
    return format_caption(Caption(tuple(nps), c.relation))


class ClipImageFeatures(torch.nn.Module):
    """The CLIP's L2-normalised image embedding as a torchmetrics feature extractor: (B, 3, H, W) floats in [0, 1]
    -> (B, E). Images go through the CLIP's own preprocessing (as PIL images)."""

    def __init__(self, clip: Clip):
        super().__init__()
        from PIL import Image

        self.clip = clip
        self.num_features = int(clip.images([Image.new("RGB", (8, 8))]).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        arr = (x.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return self.clip.images([Image.fromarray(a) for a in arr]).double()


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two score lists (ties share their mean rank; torchmetrics' implementation),
    e.g. per-image CLIPScore against the exact scorer's share of facts right."""
    from torchmetrics.functional import spearman_corrcoef

    return float(spearman_corrcoef(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)))


def frechet_distance(clip: Clip, real: Sequence, fake: Sequence) -> float:
    """Fréchet distance between two sets of PIL images in the CLIP's image features (torchmetrics' FID with the CLIP
    as feature extractor). Both sets need more than one image."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchvision.transforms.functional import pil_to_tensor

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 images per set, got {len(real)} and {len(fake)}")
    fid = FrechetInceptionDistance(feature=ClipImageFeatures(clip), normalize=True)

    def batch(ims):
        size = ims[0].size
        return torch.stack([pil_to_tensor(im.convert("RGB").resize(size)) for im in ims]).float() / 255

    fid.update(batch(list(real)), real=True)
    fid.update(batch(list(fake)), real=False)
    return float(fid.compute())


def fd_floor_ceiling(clip: Clip, real: Sequence, reference: Sequence | None = None, seed: int = 0) -> dict:
    """The two references printed beside an FD of generated images against `real`: the floor, `real` against
    `reference` (as many other real images, e.g. other scenes of the same world: the FD of a perfect generator, at
    the same set sizes), or, without one, a random half of `real` against the other half (smaller sets, so biased
    upward); and the ceiling, `real` against as many images of uniform noise."""
    import numpy as np
    from PIL import Image

    real = list(real)
    rng = np.random.default_rng(seed)
    w, hh = real[0].size
    noise = [Image.fromarray(rng.integers(0, 256, (hh, w, 3), dtype=np.uint8)) for _ in real]
    if reference is not None:
        floor = frechet_distance(clip, real, list(reference))
    else:
        order = rng.permutation(len(real))
        h = len(real) // 2
        floor = frechet_distance(clip, [real[i] for i in order[:h]], [real[i] for i in order[h:]])
    return {"floor_real_vs_real": floor, "ceiling_real_vs_noise": frechet_distance(clip, real, noise)}
