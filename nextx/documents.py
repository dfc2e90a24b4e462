"""Documents and their on-disk form: one WebDataset sample = one document (docs/design.md §8).

A document is an ordered list of segments, each `Text` or `Image`. In a tar shard a document with key K is

    K.json          {"segments": [{"text": "a red circle"}, {"image": "img0"}, ...], "meta": {...}}
    K.img0.png      the image's pixels (RGB PNG), one file per image segment
    K.img0.lat.npy  optional pre-encoded latents (float16/32 array), written by `nextx data encode`

Pairs (one text, one image) are stored caption-first; the packer decides the direction (t2i or captioning).
`decode_document` turns the raw bytes of a sample back into a Document and raises `BadSample` with the reason
on anything it cannot trust (bad json, a missing image file, an undecodable PNG), so readers can skip,
count and log instead of crashing.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np
from PIL import Image as PILImage

from nextx.errors import UserError

SHARD_PATTERN = "{split}-{index:06d}.tar"  # file names inside a shard directory
INFO_FILE = "info.json"                    # per-directory summary written by `write_shards`


class ShardsNotFound(UserError, FileNotFoundError):
    """A shard source that names no existing tar."""


class BadSample(ValueError):
    """A sample that cannot be turned into a Document; the message says why."""


@dataclass
class Text:
    text: str


@dataclass
class Image:
    """One image segment. `pixels` is an RGB PIL image; `latents` (optional) its pre-encoded latents."""

    pixels: PILImage.Image | None = None
    latents: np.ndarray | None = None
    name: str = ""  # file stem inside the sample ("img0"); assigned on write when empty


Segment = Union[Text, Image]


@dataclass
class Document:
    key: str
    segments: list[Segment]
    meta: dict = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.segments if isinstance(s, Text)]

    @property
    def images(self) -> list[Image]:
        return [s for s in self.segments if isinstance(s, Image)]

    def is_pair(self) -> bool:
        """One text then one image: the unit that can be laid out both ways (t2i or captioning)."""
        return len(self.segments) == 2 and isinstance(self.segments[0], Text) and isinstance(self.segments[1], Image)


def _check_key(key: str) -> None:
    # WebDataset splits a member name at the first dot of its basename into key and field.
    if not key or "." in key or "/" in key:
        raise ValueError(f"document key {key!r} must be non-empty and contain no '.' or '/'")


def encode_document(doc: Document) -> dict[str, bytes | str]:
    """Document -> a dict for `webdataset.TarWriter.write` (key '__key__' plus one entry per file)."""
    _check_key(doc.key)
    if not doc.segments:
        raise ValueError(f"document {doc.key!r} has no segments")
    sample: dict[str, bytes | str] = {"__key__": doc.key}
    segs = []
    n_img = 0
    for seg in doc.segments:
        if isinstance(seg, Text):
            segs.append({"text": seg.text})
            continue
        name = seg.name or f"img{n_img}"
        if "." in name or "/" in name:
            raise ValueError(f"image name {name!r} in document {doc.key!r} must contain no '.' or '/'")
        if f"{name}.png" in sample:
            raise ValueError(f"image name {name!r} used twice in document {doc.key!r}")
        n_img += 1
        if seg.pixels is None and seg.latents is None:
            raise ValueError(f"image {name!r} in document {doc.key!r} has neither pixels nor latents")
        if seg.pixels is not None:
            buf = io.BytesIO()
            seg.pixels.convert("RGB").save(buf, format="PNG")
            sample[f"{name}.png"] = buf.getvalue()
        if seg.latents is not None:
            buf = io.BytesIO()
            np.save(buf, np.asarray(seg.latents), allow_pickle=False)
            sample[f"{name}.lat.npy"] = buf.getvalue()
        segs.append({"image": name})
    sample["json"] = json.dumps({"segments": segs, "meta": doc.meta}, ensure_ascii=False).encode()
    return sample


def decode_document(sample: dict, *, load_pixels: bool = True) -> Document:
    """Raw sample (field -> bytes, as WebDataset yields it) -> Document. Raises BadSample on any defect.

    load_pixels=False skips PNG decoding for images that have latents (training on pre-encoded shards).
    """
    key = sample.get("__key__", "?")
    if "json" not in sample:
        raise BadSample(f"{key}: no json member")
    try:
        spec = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample(f"{key}: bad json ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("segments"), list) or not spec["segments"]:
        raise BadSample(f"{key}: json has no non-empty 'segments' list")
    segments: list[Segment] = []
    for i, s in enumerate(spec["segments"]):
        if not isinstance(s, dict) or len(s) != 1:
            raise BadSample(f"{key}: segment {i} must be {{'text': str}} or {{'image': name}}, got {s!r}")
        if "text" in s:
            if not isinstance(s["text"], str) or not s["text"].strip():
                raise BadSample(f"{key}: segment {i} has an empty or non-string text")
            segments.append(Text(s["text"]))
            continue
        if "image" not in s:
            raise BadSample(f"{key}: segment {i} has unknown field {next(iter(s))!r}")
        name = s["image"]
        png, lat = sample.get(f"{name}.png"), sample.get(f"{name}.lat.npy")
        if png is None and lat is None:
            raise BadSample(f"{key}: image {name!r} has no {name}.png nor {name}.lat.npy member")
        img = Image(name=name)
        if lat is not None:
            try:
                img.latents = np.load(io.BytesIO(lat), allow_pickle=False)
            except Exception as e:  # numpy raises several types on truncated data
                raise BadSample(f"{key}: latents of {name!r} unreadable ({e})") from None
        if png is not None and (load_pixels or lat is None):
            try:
                pil = PILImage.open(io.BytesIO(png))
                pil.load()
                img.pixels = pil.convert("RGB")
            except Exception as e:  # PIL raises many exception types on corrupt data
                raise BadSample(f"{key}: image {name!r} undecodable ({e})") from None
        segments.append(img)
    meta = spec.get("meta", {})
    return Document(key=key, segments=segments, meta=meta if isinstance(meta, dict) else {})


# ---------------------------------------------------------------------------------------------------------
# Writing and reading whole directories (tools and tests; training streams through nextx.data instead).


def write_shards(docs: Iterable[Document], out_dir: str | os.PathLike, *, split: str = "train",
                 max_per_shard: int = 1000, total: int | None = None, info: dict | None = None,
                 progress: bool = True) -> dict:
    """Write documents to `out_dir/{split}-000000.tar, ...` and merge a summary into `out_dir/info.json`.

    Returns the split's summary {"n_docs", "n_images", "n_shards", "shards"}. `info` entries (generator
    settings, source) are stored beside it so a shard directory documents how it was made.
    """
    import webdataset as wds
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{split}-*.tar"):  # a rewrite must not leave stale shards behind
        old.unlink()
    n_docs = n_images = 0
    shards: list[str] = []
    per_shard: list[int] = []
    writer = None
    bar = tqdm(docs, total=total, desc=f"write {split}", unit="doc", disable=not progress)
    for doc in bar:
        if writer is None or n_docs % max_per_shard == 0:
            if writer is not None:
                writer.close()
            name = SHARD_PATTERN.format(split=split, index=len(shards))
            shards.append(name)
            per_shard.append(0)
            writer = wds.TarWriter(str(out / name), mtime=0)  # fixed mtime: same input -> byte-identical tar
        writer.write(encode_document(doc))
        n_docs += 1
        per_shard[-1] += 1
        n_images += len(doc.images)
    if writer is not None:
        writer.close()
    summary = {"n_docs": n_docs, "n_images": n_images, "n_shards": len(shards), "shards": shards,
               "shard_docs": per_shard}
    info_path = out / INFO_FILE
    full = json.loads(info_path.read_text()) if info_path.exists() else {}
    full.setdefault("splits", {})[split] = summary
    if info:
        full.update(info)
    info_path.write_text(json.dumps(full, indent=2, ensure_ascii=False))
    return summary


def recorded_doc_counts(paths: Iterable[str]) -> dict[str, int]:
    """{tar path: documents it held when written}, from the info.json beside each tar (`shard_docs`, or the split's
    n_docs for a one-shard split); tars without a record are left out. A reader that sees fewer is truncated."""
    out: dict[str, int] = {}
    infos: dict[Path, dict] = {}
    for p in paths:
        d = Path(p).parent
        if d not in infos:
            try:
                infos[d] = json.loads((d / INFO_FILE).read_text())
            except (OSError, ValueError):
                infos[d] = {}
        for split in infos[d].get("splits", {}).values():
            names = split.get("shards", [])
            if Path(p).name in names:
                if "shard_docs" in split:
                    out[p] = int(split["shard_docs"][names.index(Path(p).name)])
                elif len(names) == 1:
                    out[p] = int(split["n_docs"])
    return out


def shard_paths(source: str | os.PathLike, split: str | None = None) -> list[str]:
    """A shard directory (optionally one split of it), a single .tar, or a brace pattern -> sorted tar paths."""
    src = str(source)
    if "{" in src:
        import braceexpand
        paths = list(braceexpand.braceexpand(src))
    elif os.path.isdir(src):
        pat = f"{split}-*.tar" if split else "*.tar"
        paths = sorted(str(p) for p in Path(src).glob(pat))
    else:
        paths = [src]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ShardsNotFound(f"shard(s) not found: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                             "(a shard dir, a .tar, or a brace pattern of tars)")
    if not paths:
        raise FileNotFoundError(f"no shards in {src}" + (f" for split {split!r}" if split else ""))
    return paths


def iter_raw_samples(paths: list[str]) -> Iterator[dict]:
    """Sequential, deterministic read of raw samples from tar files (no shuffling, no workers)."""
    import webdataset as wds

    # tarfile_to_samples, not wds.WebDataset: the latter splits urls by DataLoader worker on its own.
    yield from wds.tarfile_to_samples()([{"url": p} for p in paths])
