"""Look inside a shard directory: counts, caption lengths, image sizes, latents, bad samples, a PNG grid.

    nextx data inspect data/emoji64                       every split, then the totals
    nextx data inspect data/emoji64 --split heldout --grid grid.png --n 16
    nextx data inspect data/emoji64 --validate            decode every image too; exit 1 on any bad sample

Run it as a module or through `nextx`, never by path: as a script this file would shadow the standard library's
`inspect`.

Output. Per split an indented block (`  documents: N`, bad samples with the first reasons, images and latents,
text segments, caption length in characters, segment layouts, image sizes, latent shapes), then the unindented
totals; the line `documents: N` (total good documents) is the one scripts grep for: `grep '^documents:'`.

Checks. Without --validate each sample is decoded by `nextx.documents.decode_document(load_pixels=False)`: the
json, every member and the latents are checked, and PNGs are decoded only for images that have no latents (so
pre-encoded shards are read quickly; their sizes come from the PNG header). --validate decodes every PNG as well
and exits 1 when any sample is bad. A tar that breaks off (truncated, not a tar) counts as one bad sample that
names the shard and how many samples were read before the break, and reading goes on with the next shard.

Grid. --grid writes the first --n documents (in split then shard order) as a PNG: each cell shows the document's
first image (or a blank) with its first text under it, wrapped to two lines and truncated, in PIL's default font.
"""

from __future__ import annotations

import sys

# Before any other import: run by path, `import dataclasses` (which imports inspect) would load this file.
if __name__ == "__main__" and not __package__:
    sys.exit("run as `python -m data_tools.inspect` or `nextx data inspect`: by path, this file would shadow "
             "the standard library's inspect")

import argparse
import io
import json
import math
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from nextx.documents import INFO_FILE, BadSample, Document, Text, decode_document, iter_raw_samples, shard_paths

N_REASONS = 5       # bad-sample reasons printed per split
CELL = 96           # grid: image side in pixels
TEXT_LINES = 2      # grid: caption lines under each image
LINE_PX = 12


@dataclass
class SplitStats:
    shards: list[str]
    docs: int = 0
    bad: int = 0
    reasons: list[str] = field(default_factory=list)
    images: int = 0
    with_latents: int = 0
    texts: int = 0
    chars: list[int] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    latents: Counter = field(default_factory=Counter)
    layouts: Counter = field(default_factory=Counter)

    def add_bad(self, reason: str) -> None:
        self.bad += 1
        if len(self.reasons) < N_REASONS:
            self.reasons.append(reason)

    def add(self, doc: Document, sample: dict) -> None:
        self.docs += 1
        self.layouts[",".join("text" if isinstance(s, Text) else "image" for s in doc.segments)] += 1
        for t in doc.texts:
            self.texts += 1
            self.chars.append(len(t))
        for img in doc.images:
            self.images += 1
            if img.pixels is not None:
                self.sizes[f"{img.pixels.width}x{img.pixels.height}"] += 1
            elif f"{img.name}.png" in sample:  # latents present, PNG not decoded: read its header only
                try:
                    with PILImage.open(io.BytesIO(sample[f"{img.name}.png"])) as im:
                        self.sizes[f"{im.width}x{im.height}"] += 1
                except Exception:  # not validated here; --validate decodes it and counts the sample bad
                    self.sizes["unreadable png header"] += 1
            if img.latents is not None:
                self.with_latents += 1
                self.latents[f"{tuple(img.latents.shape)} {img.latents.dtype}"] += 1


def splits_of(src: str, split: str | None) -> dict[str, list[str]]:
    """Shard paths grouped by split name (the file name before '-NNNNNN.tar'), train first; a lone tar is its own
    split."""
    paths = shard_paths(src, split)
    groups: dict[str, list[str]] = {}
    for p in paths:
        m = re.fullmatch(r"(.+)-\d+\.tar", Path(p).name)
        groups.setdefault(m.group(1) if m else Path(p).stem, []).append(p)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] != "train", kv[0])))  # train first


def scan(paths: list[str], validate: bool, grid: list[Document], n_grid: int) -> SplitStats:
    """Read every sample of the shards, fill the stats and the first n_grid documents (pixels decoded)."""
    st = SplitStats(shards=paths)
    for path in paths:
        read = 0
        try:
            for sample in iter_raw_samples([path]):
                read += 1
                try:
                    doc = decode_document(sample, load_pixels=validate)
                    if len(grid) < n_grid:
                        grid.append(doc if validate else decode_document(sample))
                except BadSample as e:
                    st.add_bad(str(e))
                    continue
                st.add(doc, sample)
        except Exception as e:  # tarfile, gzip and webdataset raise several types on broken archives
            st.add_bad(f"{Path(path).name}: unreadable after {read} sample(s) ({type(e).__name__}: {e})")
    return st


def _size_list(c: Counter, k: int = 5) -> str:
    if not c:
        return "none"
    return ", ".join(f"{s} ({n})" for s, n in c.most_common(k)) + (f", ... ({len(c)} kinds)" if len(c) > k else "")


def report(name: str, st: SplitStats) -> list[str]:
    first, last = Path(st.shards[0]).name, Path(st.shards[-1]).name
    lines = [f"== {name}: {len(st.shards)} shard(s) {first}" + (f" ... {last}" if len(st.shards) > 1 else ""),
             f"  documents: {st.docs}", f"  bad samples: {st.bad}"]
    lines += [f"    {r}" for r in st.reasons]
    lines.append(f"  images: {st.images} (with latents: {st.with_latents})")
    lines.append(f"  text segments: {st.texts}")
    if st.chars:
        lines.append(f"  caption chars: min {min(st.chars)}, mean {sum(st.chars) / len(st.chars):.1f}, "
                     f"max {max(st.chars)}")
    lines.append(f"  layouts: {_size_list(st.layouts, 3)}")
    lines.append(f"  image sizes: {_size_list(st.sizes)}")
    lines.append(f"  latents: {_size_list(st.latents)}")
    return lines


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=10)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _thumb(img: PILImage.Image) -> PILImage.Image:
    """Fit into CELL x CELL: shrink with LANCZOS, enlarge by an integer factor with NEAREST (pixels stay sharp)."""
    w, h = img.size
    if max(w, h) > CELL:
        s = CELL / max(w, h)
        return img.resize((max(1, round(w * s)), max(1, round(h * s))), PILImage.LANCZOS)
    k = CELL // max(w, h)
    return img.resize((w * k, h * k), PILImage.NEAREST)


def draw_grid(docs: list[Document], out: str | Path) -> PILImage.Image:
    """Documents -> a PNG grid: first image on top, first text (two lines, truncated) under it."""
    cols = max(1, math.ceil(math.sqrt(len(docs))))
    rows = max(1, math.ceil(len(docs) / cols))
    cw, ch = CELL + 8, CELL + 8 + TEXT_LINES * LINE_PX
    grid = PILImage.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), _font()
    chars = max(8, CELL // 6)
    for i, doc in enumerate(docs):
        x, y = (i % cols) * cw + 4, (i // cols) * ch + 4
        pix = next((im.pixels for im in doc.images if im.pixels is not None), None)
        if pix is not None:
            t = _thumb(pix)
            grid.paste(t, (x + (CELL - t.width) // 2, y + (CELL - t.height) // 2))
        else:
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), outline=(200, 200, 200))
        text = " ".join(doc.texts[0].split()) if doc.texts else "(no text)"
        lines = textwrap.wrap(text, chars)
        if len(lines) > TEXT_LINES:
            lines = lines[:TEXT_LINES]
            lines[-1] = lines[-1][:chars - 3] + "..."
        for j, line in enumerate(lines):
            try:
                draw.text((x, y + CELL + 2 + j * LINE_PX), line, fill=(0, 0, 0), font=font)
            except UnicodeEncodeError:  # the bitmap fallback font is latin-1 only
                draw.text((x, y + CELL + 2 + j * LINE_PX), line.encode("latin-1", "replace").decode("latin-1"),
                          fill=(0, 0, 0), font=font)
    grid.save(out)
    return grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx data inspect", description="Counts, caption lengths, image sizes, "
                                "latents and bad samples of a shard directory; optionally a PNG grid.")
    p.add_argument("src", help="shard directory (or one .tar)")
    p.add_argument("--split", default=None, help="only this split (default: all)")
    p.add_argument("--grid", default=None, help="write a PNG grid of the first --n documents here")
    p.add_argument("--n", type=int, default=16, help="documents in the grid (default 16)")
    p.add_argument("--validate", action="store_true", help="decode every image; exit 1 if any sample is bad")
    a = p.parse_args(argv)
    try:
        groups = splits_of(a.src, a.split)
    except FileNotFoundError as e:
        print(f"nextx data inspect: {e}", file=sys.stderr)
        return 2
    info = Path(a.src) / INFO_FILE
    if info.is_file():
        try:
            gen = json.loads(info.read_text()).get("generator")
            print(f"{a.src}: made by {gen}" if gen else f"{a.src}")
        except ValueError:
            print(f"{a.src}: {INFO_FILE} is not json")
    grid: list[Document] = []
    total_docs = total_bad = total_images = 0
    for name, paths in groups.items():
        st = scan(paths, a.validate, grid, a.n if a.grid else 0)
        print("\n".join(report(name, st)))
        total_docs, total_bad, total_images = total_docs + st.docs, total_bad + st.bad, total_images + st.images
    print(f"documents: {total_docs}")
    print(f"images: {total_images}")
    print(f"bad samples: {total_bad}" + (" (validated: every image decoded)" if a.validate else ""))
    if a.grid:
        if grid:
            draw_grid(grid, a.grid)
            print(f"grid: {len(grid)} documents -> {a.grid}")
        else:
            print("grid: no good document to draw", file=sys.stderr)
    return 1 if a.validate and total_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
