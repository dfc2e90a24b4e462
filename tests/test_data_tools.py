"""Source tools: emoji renders, folder/jsonl pairs, interleaved jsonl, inspect; skips are counted, never fatal."""

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image as PILImage

from data_tools import emoji as emoji_tool
from data_tools import folder, interleaved
from data_tools import inspect as inspect_tool
from nextx import cli
from nextx.documents import Image, Text, decode_document, iter_raw_samples, shard_paths

FONT = Path(emoji_tool.DEFAULT_FONT)
needs_font = pytest.mark.skipif(not FONT.is_file(), reason=f"emoji font {FONT} not installed "
                                f"({emoji_tool.INSTALL_HINT})")


def read_docs(out, split=None):
    return [decode_document(s) for s in iter_raw_samples(shard_paths(out, split))]


def save_png(path, size=(20, 12), colour=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new(mode, size, colour).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """5 good captioned images (png, jpg in a subfolder, RGBA, webp), 1 without caption, 1 corrupt, 1 empty caption."""
    src = tmp_path / "pics"
    for i, (name, kw) in enumerate([("a.png", {}), ("sub/b.jpg", {"colour": (0, 90, 200)}),
                                    ("c.png", {"mode": "RGBA", "colour": (0, 200, 0, 0)}),
                                    ("d.PNG", {"size": (30, 40)}), ("e.webp", {"size": (8, 8)})]):
        save_png(src / name, **kw)
        (src / name).with_suffix(".txt").write_text(f"  caption {i}\n")
    save_png(src / "nocap.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (src / "broken.txt").write_text("a broken image")
    save_png(src / "empty.png")
    (src / "empty.txt").write_text("  \n")
    return src


# ---------------------------------------------------------------------------------------------------------
# emoji


def test_emoji_captions_flags_skin_tones_and_split_unit():
    assert emoji_tool.caption_of("\U0001F600", ":grinning_face:") == "grinning face"
    assert emoji_tool.caption_of("\U0001F1F9\U0001F1E9", ":Chad:") == "flag: Chad"
    england = "\U0001F3F4" + "".join(chr(0xE0000 + ord(c)) for c in "gbeng") + "\U000E007F"
    assert emoji_tool.caption_of(england, ":England:") == "flag: England"
    assert emoji_tool.caption_of("\u26f3", ":flag_in_hole:") == "flag in hole"
    cap = emoji_tool.caption_of("x", ":kiss_man_man_light_skin_tone_medium-dark_skin_tone:")
    assert cap == "kiss man man, light skin tone, medium-dark skin tone"
    assert emoji_tool.base_name(cap) == "kiss man man"
    # the held-out unit is the base name, so every skin tone of a concept lands in the same split
    tones = [emoji_tool.base_name(f"thumbs up, {t} skin tone") for t in ("light", "medium", "dark")]
    assert {emoji_tool.is_heldout(b, 0.5, 0) for b in tones} == {emoji_tool.is_heldout("thumbs up", 0.5, 0)}
    share = sum(emoji_tool.is_heldout(f"name {i}", 0.1, 0) for i in range(2000)) / 2000
    assert 0.07 < share < 0.13


def test_emoji_missing_font_names_path_and_install_command(tmp_path, capsys):
    missing = tmp_path / "NoFont.ttf"
    assert emoji_tool.main(["--out", str(tmp_path / "out"), "--font", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "sudo apt-get install fonts-noto-color-emoji" in err and "--font" in err
    assert not (tmp_path / "out").exists()


@needs_font
def test_emoji_renderer_skips_blank_and_multi_glyph():
    r = emoji_tool.Renderer(FONT)
    glyph, reason = r.render("\U0001F600")
    assert reason == "" and glyph.mode == "RGBA" and glyph.size == r.cell
    assert r.render(emoji_tool.MISSING) == (None, "blank")
    assert r.render("\U0001F600\U0001F600\U0001F600")[1] == "multi-glyph"
    img = emoji_tool.to_square(glyph, 24, (255, 255, 255))
    assert img.size == (24, 24) and img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


@needs_font
def test_emoji_writer_small_n(tmp_path, capsys):
    out = tmp_path / "emoji"
    assert emoji_tool.main(["--out", str(out), "--n", "40", "--size", "32", "--max-per-shard", "16"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^emoji: 40 written, skipped .*; [\d.]+ s", printed, re.M)
    docs = read_docs(out)
    assert len(docs) == 40 and len({d.key for d in docs}) == 40
    info = json.loads((out / "info.json").read_text())
    assert info["splits"]["train"]["n_docs"] + info["splits"]["heldout"]["n_docs"] == 40
    for d in docs:
        assert d.is_pair() and d.images[0].pixels.size == (32, 32) and d.texts[0].strip()
        split = "heldout" if emoji_tool.is_heldout(d.meta["base_name"], 0.1, 0) else "train"
        assert d.meta["split"] == split
    assert {d.key for d in read_docs(out, "heldout")} == {d.key for d in docs if d.meta["split"] == "heldout"}


# ---------------------------------------------------------------------------------------------------------
# folder


def test_folder_writer_from_a_folder_skips_and_counts(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert folder.main(["--src", str(image_folder), "--out", str(out), "--size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "skipped: empty caption 1, no caption 1, unreadable image 1" in printed
    assert "nocap.png: no caption file nocap.txt" in printed and "broken.png: image unreadable" in printed
    docs = read_docs(out)
    assert [d.texts[0] for d in docs] == [f"caption {i}" for i in (0, 2, 3, 4, 1)]  # sorted paths, sub/ last
    assert all(d.images[0].pixels.size == (16, 16) for d in docs)
    transparent = next(d for d in docs if d.meta["source"] == "c.png").images[0].pixels
    assert transparent.getpixel((8, 8)) == (255, 255, 255)  # alpha 0 composited onto white, not black


def test_folder_keeps_size_without_resize_and_splits_deterministically(image_folder, tmp_path):
    out = tmp_path / "out"
    assert folder.main(["--src", str(image_folder), "--out", str(out), "--heldout-frac", "0.5", "--seed", "3"]) == 0
    train, held = read_docs(out, "train"), read_docs(out, "heldout")
    assert len(train) + len(held) == 5
    assert {d.meta["source"] for d in held} == {d.meta["source"] for d in train + held
                                                if folder.is_heldout(d.meta["source"], 0.5, 3)}
    sizes = {d.meta["source"]: d.images[0].pixels.size for d in train + held}
    assert sizes["d.PNG"] == (30, 40) and sizes["sub/b.jpg"] == (20, 12)


def test_folder_writer_from_jsonl(image_folder, tmp_path, capsys):
    lines = [json.dumps({"image": "pics/a.png", "caption": "relative path"}),
             json.dumps({"image": str(image_folder / "d.PNG"), "caption": "absolute path"}),
             "{not json",
             json.dumps({"image": "pics/a.png"}),
             json.dumps({"image": "pics/gone.png", "caption": "missing file"}),
             json.dumps({"image": "pics/broken.png", "caption": "corrupt image"}),
             "",
             json.dumps({"image": "pics/a.png", "caption": " "})]
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert folder.main(["--src", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped: bad line 2, empty caption 1, image missing 1, unreadable image 1" in printed
    assert "pairs.jsonl:3: not json" in printed
    assert [d.texts[0] for d in read_docs(out)] == ["relative path", "absolute path"]


def test_folder_nothing_written_exits_nonzero(tmp_path, capsys):
    src = tmp_path / "empty"
    src.mkdir()
    save_png(src / "x.png")
    assert folder.main(["--src", str(src), "--out", str(tmp_path / "out")]) == 1
    assert "nothing written" in capsys.readouterr().err
    assert folder.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2


def test_identical_input_gives_byte_identical_shards(image_folder, tmp_path):
    for name in ("one", "two"):
        assert folder.main(["--src", str(image_folder), "--out", str(tmp_path / name), "--max-per-shard", "2"]) == 0
    tars = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert len(tars) == 3
    for t in tars:
        assert (tmp_path / "one" / t).read_bytes() == (tmp_path / "two" / t).read_bytes()


# ---------------------------------------------------------------------------------------------------------
# interleaved


def test_interleaved_writer_keeps_order_and_skips_bad_documents(image_folder, tmp_path, capsys):
    docs_in = [
        {"segments": [{"text": "Step 1."}, {"image": "pics/a.png"}, {"text": "Step 2."}, {"image": "pics/c.png"}],
         "meta": {"topic": "steps"}},
        {"segments": [{"image": "pics/d.PNG"}, {"text": "after the image"}]},
        {"segments": [{"text": "text only"}]},
        {"segments": [{"text": "x"}, {"video": "v.mp4"}]},
        {"segments": [{"text": "x"}, {"image": "pics/gone.png"}]},
        {"segments": [{"text": "  "}]},
        {"segments": []},
        {"segments": [{"image": "pics/broken.png"}]},
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in docs_in) + "\nnot json\n")
    out = tmp_path / "out"
    assert interleaved.main(["--src", str(src), "--out", str(out), "--size", "8"]) == 0
    printed = capsys.readouterr().out
    assert ("skipped: bad line 2, bad segment 1, empty text 1, image missing 1, unreadable image 1" in printed)
    assert "interleaved: 3 written (4 texts, 3 images), 6 skipped" in printed
    docs = read_docs(out)
    kinds = [[type(s).__name__ for s in d.segments] for d in docs]
    assert kinds == [["Text", "Image", "Text", "Image"], ["Image", "Text"], ["Text"]]
    assert docs[0].texts == ["Step 1.", "Step 2."] and docs[0].meta == {"topic": "steps", "source": "docs.jsonl:1"}
    assert all(isinstance(s, Text) or s.pixels.size == (8, 8) for d in docs for s in d.segments)
    bad_only = tmp_path / "bad.jsonl"
    bad_only.write_text("not json\n")
    assert interleaved.main(["--src", str(bad_only), "--out", str(tmp_path / "o2")]) == 1


# ---------------------------------------------------------------------------------------------------------
# inspect


@pytest.fixture
def shards(image_folder, tmp_path):
    out = tmp_path / "shards"
    assert folder.main(["--src", str(image_folder), "--out", str(out), "--size", "16", "--heldout-frac", "0.4",
                        "--max-per-shard", "2"]) == 0
    return out


def test_inspect_counts_and_grid(shards, tmp_path, capsys):
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert cli.main(["data", "inspect", str(shards), "--grid", str(grid), "--n", "4"]) == 0
    printed = capsys.readouterr().out
    assert re.findall(r"^documents: (\d+)$", printed, re.M) == ["5"]
    per_split = [int(n) for n in re.findall(r"^  documents: (\d+)$", printed, re.M)]
    assert len(per_split) == 2 and sum(per_split) == 5
    assert "image sizes: 16x16 (" in printed and "caption chars: min 9, mean 9.0, max 9" in printed
    assert re.search(r"^bad samples: 0$", printed, re.M)
    with PILImage.open(grid) as g:
        assert g.size == (2 * (inspect_tool.CELL + 8), 2 * (inspect_tool.CELL + 8 + 2 * inspect_tool.LINE_PX))
    assert inspect_tool.main([str(shards), "--split", "heldout"]) == 0
    held = re.findall(r"^documents: (\d+)$", capsys.readouterr().out, re.M)
    assert held == [str(len(read_docs(shards, "heldout")))]


def _rewrite_tar(path, corrupt_member):
    """Copy a tar member for member, replacing the bytes of the first member whose name ends in corrupt_member."""
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    done = False
    with tarfile.open(path, "w") as t:
        for m, data in members:
            if not done and m.name.endswith(corrupt_member):
                data, done = b"\x89PNG\r\n\x1a\n garbage", True
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    assert done


def test_inspect_validate_fails_on_a_corrupted_shard(shards, capsys):
    assert inspect_tool.main([str(shards), "--validate"]) == 0
    _rewrite_tar(shards / "train-000000.tar", ".img0.png")
    capsys.readouterr()
    assert inspect_tool.main([str(shards), "--validate"]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"^bad samples: 1", printed, re.M) and "undecodable" in printed
    assert re.findall(r"^documents: (\d+)$", printed, re.M) == ["4"]


def test_inspect_validate_fails_on_a_truncated_shard(shards, capsys):
    tar = shards / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:700])  # the header of the first member and part of its data
    assert inspect_tool.main([str(shards), "--validate"]) == 1
    printed = capsys.readouterr().out
    assert "train-000000.tar: unreadable after" in printed
    assert inspect_tool.main([str(shards / "nope")]) == 2


def test_inspect_reports_latents_and_reads_png_headers_only(tmp_path, capsys):
    import numpy as np

    from nextx.documents import Document, write_shards

    docs = [Document(f"d{i}", [Text("a cap"), Image(pixels=PILImage.new("RGB", (12, 10)),
                                                     latents=np.zeros((4, 2, 2), np.float16))]) for i in range(3)]
    write_shards(docs, tmp_path, progress=False)
    assert inspect_tool.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "latents: (4, 2, 2) float16 (3)" in printed and "image sizes: 12x10 (3)" in printed
