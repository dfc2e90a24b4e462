"""Interleaved documents (text and images in any order) from a jsonl -> shards.

    nextx data interleaved --src docs.jsonl --out data/docs --size 64

Source. One document a line:
    {"segments": [{"text": "Step 1."}, {"image": "img/a.png"}, {"text": "Step 2."}, {"image": "img/b.png"}],
     "meta": {...}}                                                   ("meta" optional, any json object)
Segments come in any order and number (several images, text only, image only). A relative image path is taken
from the jsonl's folder. Texts are kept as written (interleaved prose may need its spacing); a text that is
empty after stripping is a defect.

Skips. A line that is not json, has no non-empty "segments" list, a segment other than {"text": str} or
{"image": str}, an empty text, a missing or unreadable image: the whole document is skipped and counted by kind
with its line number among the first few reasons. Exit 1 when nothing was written, 2 when --src is missing.

Images and split: as `data_tools.folder` (--size center-crops and resizes, alpha goes onto white, --heldout-frac
hashes "seed:line number" to `heldout`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from data_tools.folder import Skips, add_split_args, check_split_args, is_heldout, key_prefix, load_image
from nextx.documents import Document, Image, Text, write_shards


class Defect(ValueError):
    """A line that cannot become a document; `kind` is the skip counter it goes to."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def parse_line(line: str, where: str) -> tuple[list[tuple[str, str]], dict]:
    """One jsonl line -> ([("text", t) | ("image", path), ...], meta); raises Defect."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise Defect("bad line", f"{where}: not json ({e})") from None
    segs = obj.get("segments") if isinstance(obj, dict) else None
    if not isinstance(segs, list) or not segs:
        raise Defect("bad line", f"{where}: needs a non-empty 'segments' list")
    out = []
    for i, s in enumerate(segs):
        if isinstance(s, dict) and len(s) == 1 and isinstance(s.get("text"), str):
            if not s["text"].strip():
                raise Defect("empty text", f"{where}: segment {i} is an empty text")
            out.append(("text", s["text"]))
        elif isinstance(s, dict) and len(s) == 1 and isinstance(s.get("image"), str):
            out.append(("image", s["image"]))
        else:
            raise Defect("bad segment", f"{where}: segment {i} must be {{'text': str}} or {{'image': str}}, "
                             f"got {json.dumps(s)[:80]}")
    meta = obj.get("meta", {})
    return out, meta if isinstance(meta, dict) else {"meta": meta}


def documents(lines: list[tuple[int, str]], src: Path, prefix: str, size: int | None, skips: Skips,
              counts: Counter) -> Iterator[Document]:
    """Parse and load one document at a time; any defect skips the whole document."""
    for lineno, line in lines:
        where = f"{src.name}:{lineno}"
        try:
            segs, meta = parse_line(line, where)
        except Defect as e:
            skips.add(e.kind, str(e))
            continue
        segments: list = []
        for kind, value in segs:
            if kind == "text":
                segments.append(Text(value))
                continue
            path = Path(value) if Path(value).is_absolute() else src.parent / value
            try:
                segments.append(Image(pixels=load_image(path, size)))
            except FileNotFoundError:
                skips.add("image missing", f"{where}: image {value} not found")
                break
            except Exception as e:  # PIL raises many types on corrupt data
                skips.add("unreadable image", f"{where}: image {value} unreadable ({type(e).__name__}: {e})")
                break
        else:
            counts["images"] += sum(isinstance(s, Image) for s in segments)
            counts["texts"] += sum(isinstance(s, Text) for s in segments)
            yield Document(f"{prefix}_{lineno:07d}", segments, {**meta, "source": where})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx data interleaved", description="A jsonl of {\"segments\": [{\"text\": "
                                "...}, {\"image\": path}, ...]} -> WebDataset shards, one document a line.")
    p.add_argument("--src", required=True, help=".jsonl file, one document a line")
    add_split_args(p)
    a = p.parse_args(argv)
    check_split_args(p, a)
    src = Path(a.src)
    if not src.is_file():
        print(f"nextx data interleaved: --src {src} is not a file", file=sys.stderr)
        return 2
    t0 = time.time()
    with open(src, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    parts = {a.split: [x for x in lines if not is_heldout(str(x[0]), a.heldout_frac, a.seed)]}
    if a.heldout_frac > 0:
        parts["heldout"] = [x for x in lines if is_heldout(str(x[0]), a.heldout_frac, a.seed)]
    skips, counts, written = Skips(), Counter(), 0
    info = {"generator": "data_tools.interleaved", "source": str(src.resolve()), "image_size": a.size,
            "heldout_frac": a.heldout_frac, "seed": a.seed}
    for split, part in parts.items():
        summary = write_shards(documents(part, src, key_prefix(src), a.size, skips, counts), a.out, split=split,
                               max_per_shard=a.max_per_shard, total=len(part), info=info)
        written += summary["n_docs"]
        print(f"{split}: {summary['n_docs']} docs in {summary['n_shards']} shard(s)")
    print(skips.report())
    print(f"interleaved: {written} written ({counts['texts']} texts, {counts['images']} images), {skips.total} "
          f"skipped; {time.time() - t0:.1f} s -> {a.out}")
    if written == 0:
        print(f"nextx data interleaved: nothing written from {src}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
