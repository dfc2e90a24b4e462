"""Noto Color Emoji renders captioned with their CLDR names -> shards.

    nextx data emoji --out data/emoji64 --size 64            (same as: python -m data_tools.emoji ...)

Run it as a module or through `nextx`, never by path: as a script this file would shadow the `emoji` package.

Source. Every fully-qualified emoji of the `emoji` package (5,244 entries, 3,963 fully qualified in 2.16) is drawn
with Pillow from Noto Color Emoji (`apt-get install fonts-noto-color-emoji`). The font is a CBDT bitmap font whose
only strike is 109 px, so it loads only as `ImageFont.truetype(path, 109)`, and every glyph is a 136x128 RGBA
bitmap (`embedded_color=True`). Pillow with raqm shapes ZWJ and skin-tone sequences into one glyph where the
font has it. A render is skipped and counted when it is
- blank: no pixel drawn (the font lacks the emoji: newer than the font, e.g. Emoji 16-18),
- tofu: the same pixels as a code point no font has (fonts that draw a box for missing glyphs),
- multi-glyph: wider than 1.5 glyph cells (a ZWJ sequence the font lacks falls apart into its parts; without
  raqm every sequence does).
Measured with fonts-noto-color-emoji 2.047 and emoji 2.16: 3,789 single-glyph renders (1,899 base + 1,890
skin-tone variants), 23 blank, 151 multi-glyph.

Image. The glyph cell is composited onto `--background` (white), centred in a square of side max(w, h) and
resized to --size with LANCZOS. Every emoji keeps the font's scale (no tight crop), so small symbols stay small.

Caption. The package's name with '_' -> ' ' (':grinning_face:' -> "grinning face"), flags as "flag: Chad", and
skin tones after commas: "thumbs up, medium skin tone", "kiss woman man, light skin tone, dark skin tone".

Split. `heldout` takes the emoji whose *base* name (skin tones removed) hashes below --heldout-frac, so all
variants of a held-out concept are held out together and caption-to-image retrieval sees unseen concepts. The
hash is sha1 of "seed:base name": stable across machines, Python versions and --n.
"""

from __future__ import annotations

import sys

# Before any other import: run by path, `import emoji` would load this file instead of the package.
if __name__ == "__main__" and not __package__:
    sys.exit("run as `python -m data_tools.emoji` or `nextx data emoji`: by path, this file would shadow "
             "the `emoji` package")

import argparse
import hashlib
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageColor, ImageDraw, ImageFont

from nextx.documents import Document, Image, Text, write_shards

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
INSTALL_HINT = "sudo apt-get install fonts-noto-color-emoji"
STRIKE_PX = 109             # the only bitmap size of the CBDT font; any other size fails to load
MULTI_GLYPH_WIDTH = 1.5     # a render wider than this many glyph cells is several glyphs
REFERENCE = "\U0001F600"    # grinning face: present in every Noto Color Emoji, gives the glyph cell
MISSING = "\U0010FFFD"      # a private-use code point no emoji font has: its render is the font's tofu
TONES = r"(?:light|medium-light|medium|medium-dark|dark) skin tone"
SKIN_TONE_RE = re.compile(rf" ({TONES})")       # in a package name: "thumbs up medium skin tone"
CAPTION_TONE_RE = re.compile(rf", {TONES}")     # in a caption:      "thumbs up, medium skin tone"
SKIN_TONE_MODIFIERS = range(0x1F3FB, 0x1F400)
REGIONAL = range(0x1F1E6, 0x1F200)   # regional indicator letters: two of them make a country flag
TAGS = range(0xE0020, 0xE0080)       # tag characters: black flag + tags make England, Scotland, Wales


class SetupError(RuntimeError):
    """The font is missing or not a colour bitmap font Pillow can draw, or the `emoji` package is missing."""


def caption_of(e: str, cldr: str) -> str:
    """Emoji string and its package name (':thumbs_up_medium_skin_tone:') -> caption text."""
    name = cldr.strip(":").replace("_", " ")
    cps = [ord(c) for c in e]
    if (len(cps) == 2 and all(c in REGIONAL for c in cps)) or (
            len(cps) > 2 and cps[0] == 0x1F3F4 and all(c in TAGS for c in cps[1:])):
        return f"flag: {name}"
    return SKIN_TONE_RE.sub(r", \1", name)


def base_name(caption: str) -> str:
    """Caption without skin tones: the unit of the held-out split ("thumbs up, dark skin tone" -> "thumbs up")."""
    return CAPTION_TONE_RE.sub("", caption)


def is_heldout(base: str, frac: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha1(f"{seed}:{base}".encode()).digest()[:8], "big")
    return h / 2 ** 64 < frac


def has_skin_tone(e: str) -> bool:
    return any(ord(c) in SKIN_TONE_MODIFIERS for c in e)


def candidates(skin_tones: bool = True) -> list[tuple[str, dict]]:
    """Fully-qualified emoji of the `emoji` package, sorted by code points (independent of its dict order)."""
    try:
        import emoji
    except ImportError:
        raise SetupError("the `emoji` package (captions) is not installed: pip install emoji") from None
    out = [(e, d) for e, d in emoji.EMOJI_DATA.items() if d["status"] == emoji.STATUS["fully_qualified"]]
    if not skin_tones:
        out = [(e, d) for e, d in out if not has_skin_tone(e)]
    return sorted(out, key=lambda x: [ord(c) for c in x[0]])


class Renderer:
    """Draws one emoji at the font's strike size and checks that it is one real glyph."""

    def __init__(self, font_path: str | Path):
        path = Path(font_path)
        if not path.is_file():
            raise SetupError(f"emoji font not found: {path}\n  install it with: {INSTALL_HINT}\n"
                            f"  or pass --font PATH to a Noto Color Emoji .ttf")
        try:
            self.font = ImageFont.truetype(str(path), STRIKE_PX)
        except OSError as e:
            raise SetupError(f"cannot load {path} at {STRIKE_PX} px ({e}); expected the CBDT bitmap font "
                            f"NotoColorEmoji.ttf ({INSTALL_HINT})") from None
        ref = self._draw(REFERENCE)
        if ref is None:
            raise SetupError(f"{path} draws nothing for {REFERENCE!r}: not a colour emoji font")
        self.cell = ref.size                                   # (136, 128) for Noto Color Emoji
        self.tofu = self._draw(MISSING)                        # None when missing glyphs are blank

    def _draw(self, e: str) -> PILImage.Image | None:
        """RGBA render cropped to the glyph advance box, or None when nothing is drawn."""
        left, top, right, bottom = self.font.getbbox(e)
        if right - left <= 0 or bottom - top <= 0:
            return None
        im = PILImage.new("RGBA", (right, bottom), (0, 0, 0, 0))
        ImageDraw.Draw(im).text((0, 0), e, font=self.font, embedded_color=True)
        if im.getchannel("A").getbbox() is None:
            return None
        return im.crop((left, top, right, bottom))

    def render(self, e: str) -> tuple[PILImage.Image | None, str]:
        """Emoji -> (RGBA glyph, "") or (None, reason) with reason in {"blank", "tofu", "multi-glyph"}."""
        im = self._draw(e)
        if im is None:
            return None, "blank"
        if im.width > MULTI_GLYPH_WIDTH * self.cell[0]:
            return None, "multi-glyph"
        if self.tofu is not None and im.size == self.tofu.size and np.array_equal(np.asarray(im),
                                                                                  np.asarray(self.tofu)):
            return None, "tofu"
        return im, ""


def to_square(glyph: PILImage.Image, size: int, background: tuple[int, int, int]) -> PILImage.Image:
    """RGBA glyph -> (size, size) RGB: composite on the background, centre in a square, LANCZOS resize."""
    side = max(glyph.size)
    canvas = PILImage.new("RGBA", (side, side), background + (255,))
    canvas.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return canvas.convert("RGB").resize((size, size), PILImage.LANCZOS)


def render_all(renderer: Renderer, *, size: int, n: int | None, heldout_frac: float, seed: int,
               background: tuple[int, int, int], skin_tones: bool, skipped: Counter,
               progress: bool = True) -> list[Document]:
    """Render up to n good emoji (all when None) in code-point order; skipped renders are counted by reason."""
    from tqdm import tqdm

    out: list[Document] = []
    cands = candidates(skin_tones)
    bar = tqdm(cands, desc="render", unit="emoji", disable=not progress)
    for e, data in bar:
        if n is not None and len(out) >= n:
            break
        glyph, reason = renderer.render(e)
        if glyph is None:
            skipped[reason] += 1
            continue
        caption = caption_of(e, data["en"])
        base = base_name(caption)
        split = "heldout" if is_heldout(base, heldout_frac, seed) else "train"
        cps = "-".join(f"{ord(c):x}" for c in e)
        meta = {"emoji": e, "codepoints": cps, "name": data["en"], "base_name": base,
                "emoji_version": data.get("E"), "skin_tone": has_skin_tone(e),
                "split": split, "image_size": size}
        out.append(Document(f"emoji{size}_{cps}", [Text(caption), Image(pixels=to_square(glyph, size, background))],
                            meta))
    bar.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx data emoji", description="Noto Color Emoji renders captioned with "
                                "their names -> WebDataset shards (splits 'train' and 'heldout').")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--force", action="store_true", help="replace what --out already holds")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--n", type=int, default=None, help="write at most this many emoji (default: all)")
    p.add_argument("--font", default=DEFAULT_FONT, help=f"Noto Color Emoji .ttf (default {DEFAULT_FONT})")
    p.add_argument("--background", default="white", help="background colour, any PIL colour (default white)")
    p.add_argument("--no-skin-tones", action="store_true", help="only the base emoji (no skin-tone variants)")
    p.add_argument("--heldout-frac", type=float, default=0.1, help="share of base names held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out hash")
    p.add_argument("--max-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    from nextx.errors import refuse_existing

    refuse_existing(a.out, a.force, "shards", "*.tar")
    if a.size < 1 or not 0 <= a.heldout_frac <= 1 or (a.n is not None and a.n < 1):
        p.error("need --size >= 1, 0 <= --heldout-frac <= 1 and --n >= 1")
    try:
        background = ImageColor.getrgb(a.background)[:3]
    except ValueError as e:
        p.error(f"--background: {e}")
    t0 = time.time()
    try:
        renderer = Renderer(a.font)
        skipped: Counter = Counter()
        rendered = render_all(renderer, size=a.size, n=a.n, heldout_frac=a.heldout_frac, seed=a.seed,
                              background=background, skin_tones=not a.no_skin_tones, skipped=skipped)
    except SetupError as e:
        print(f"nextx data emoji: {e}", file=sys.stderr)
        return 2
    import emoji

    info = {"generator": "data_tools.emoji", "image_size": a.size, "font": str(a.font),
            "emoji_package": emoji.__version__, "background": list(background), "heldout_frac": a.heldout_frac,
            "seed": a.seed, "skin_tones": not a.no_skin_tones, "skipped": dict(skipped)}
    for split in ("train", "heldout"):
        docs = [d for d in rendered if d.meta["split"] == split]
        summary = write_shards(docs, a.out, split=split, max_per_shard=a.max_per_shard, total=len(docs), info=info)
        n_tone = sum(d.meta["skin_tone"] for d in docs)
        print(f"{split}: {summary['n_docs']} docs in {summary['n_shards']} shard(s); "
              f"base {summary['n_docs'] - n_tone}, skin-tone variants {n_tone}")
    print(f"emoji: {len(rendered)} written, skipped " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
                                                       or "none") + f"; {time.time() - t0:.1f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
