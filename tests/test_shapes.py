"""Procedural shapes: grammar round trip, splits, determinism, renders, the exact scorer and the shard job."""

import json
import math

import numpy as np
import pytest

from data_tools.shapes import (GEOMETRY, HELDOUT_PAIRS, HELDOUT_RELATIONS, NP, PALETTE, REL_MARGIN, REL_SLACK,
                               SHAPES, Background, Caption, Obj, ParseError, Scene, caption_facts, coverage,
                               format_caption, make_documents, parse_caption, render, sample_caption, sample_scene,
                               scene_facts)
from data_tools.shapes import main as shapes_main
from evals.shapes_score import (detect, failures, foreground, layout_overlap, match, score_caption, score_image,
                                score_objects, selfcheck)
from nextx.documents import decode_document, iter_raw_samples, shard_paths


@pytest.fixture(scope="module")
def train_docs():
    return list(make_documents(300, seed=1, size=32))


def test_round_trip_recovers_the_asserted_facts():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = sample_scene(rng)
        cap, refs = sample_caption(rng, scene)
        objects = [o.as_meta() for o in scene.objects]
        parsed = parse_caption(format_caption(cap))
        assert parsed == cap
        asserted = caption_facts(cap, refs)
        assert asserted <= scene_facts(objects)                        # every asserted fact is true
        assert caption_facts(parsed, match(parsed, objects)) == asserted  # and the parse recovers exactly them
        assert sorted(refs) == list(range(len(objects)))               # every object is named once


@pytest.mark.parametrize("text", [
    "a red circle", "an orange star in the center", "a small white ring in the bottom right",
    "a large black heart and a green cross in the top left",
    "a yellow diamond, a small purple square and an orange triangle in the middle left",
    "a blue circle to the right of a large red square", "a red circle below a blue ring"])
def test_every_form_parses_back(text):
    assert format_caption(parse_caption(text)) == text


@pytest.mark.parametrize("text", [
    "", "a red circle.", "A red circle", "a orange circle", "an red circle", "a red circle and",
    "a huge red circle", "a red circle in the top", "a pink circle", "a red circle  and a blue ring",
    "a red circle, a blue square", "a red circle above a blue ring and a green star",
    "a red circle and a blue ring and a green star", "red circle", "a red circle in top left",
    "a red circle, a blue ring, a green star and a black heart"])
def test_malformed_captions_raise(text):
    with pytest.raises(ParseError):
        parse_caption(text)


def test_cell_tokens_by_hand():
    """Token centres at 32 px with 4 px patches: 2, 6, 10 | 14, 18 | 22, 26, 30 against cell borders 10.7 / 21.3."""
    from data_tools.shapes import CELLS, cell_tokens

    tl = np.zeros((8, 8), bool)
    tl[:3, :3] = True
    assert (cell_tokens("top left", (8, 8)) == tl).all()
    c = np.zeros((8, 8), bool)
    c[3:5, 3:5] = True
    assert (cell_tokens("center", (8, 8)) == c).all()
    br = np.zeros((8, 8), bool)
    br[5:, 5:] = True
    assert (cell_tokens("bottom right", (8, 8)) == br).all()
    for grid in ((8, 8), (4, 6), (3, 3)):                        # the nine cells tile any grid, each token once
        assert (sum(cell_tokens(cell, grid).astype(int) for cell in CELLS) == 1).all()
    assert cell_tokens("middle right", (3, 3)).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="unknown cell"):
        cell_tokens("left", (8, 8))


def test_part_region_reads_the_cell_of_a_finished_part():
    from data_tools.shapes import cell_tokens
    from data_tools.shapes import part_region

    assert (part_region("a small red circle in the top middle", (8, 8)) == cell_tokens("top middle", (8, 8))).all()
    assert part_region("a small red circle", (8, 8)) is None                    # no cell named: claims nothing
    assert part_region("a small red circle in the top", (8, 8)) is None         # words outside the language
    assert part_region("a red circle above a blue square", (8, 8)) is None      # not one part


def test_words_fit_the_prompt():
    """Every part names a cell, no two the same, the relation holds between the cells."""
    from data_tools.shapes import words_fit

    rel = "a red circle to the left of a blue square"
    assert words_fit(rel, ["a red circle in the top left", "a blue square in the bottom middle"])
    assert not words_fit(rel, ["a red circle in the top middle", "a blue square in the bottom middle"])  # one column
    assert not words_fit(rel, ["a red circle in the top right", "a blue square in the center"])
    assert words_fit("a red circle below a blue square", ["a red circle in the center", "a blue square in the top right"])
    assert not words_fit("a red circle above a blue square", ["a red circle in the center", "a blue square in the top right"])
    two = "a red circle and a blue square"
    assert not words_fit(two, ["a red circle in the center", "a blue square in the center"])      # one cell
    assert not words_fit(two, ["a red circle in the center", "a blue square"])                    # no cell
    assert not words_fit(two, ["a red circle in the center", "a blue square in the"])             # not the language
    assert words_fit("a white star", ["a white star in the bottom left"])
    assert not words_fit("a white star", ["a white star"])
    assert words_fit("a red circle AND a blue square", ["a red circle in the top left", "a blue square in the center"])
    assert not words_fit("a red circle AND a blue square", ["a red circle in the center", "a blue square in the center"])


def test_relation_and_facts_mapping():
    cap = parse_caption("a large red circle to the right of a blue square in the center")
    assert cap == Caption((NP("red", "circle", "large"), NP("blue", "square", None, "center")), "to the right of")
    assert caption_facts(cap, (0, 1)) == {("count", 2), ("colour", 0, "red"), ("shape", 0, "circle"),
                                          ("size", 0, "large"), ("colour", 1, "blue"), ("shape", 1, "square"),
                                          ("position", 1, "center"), ("relation", 1, "left_of", 0)}


def test_shape_areas_and_coverage_are_unbiased():
    for s in SHAPES:
        area, _, wh = GEOMETRY[s]
        cov = coverage(s, (100.0, 100.0), 160.0, (0, 0, 200, 200))
        assert cov.sum() / 160 ** 2 == pytest.approx(area, rel=0.01)
        assert max(wh) == pytest.approx(1.0)


def test_relations_hold_in_renders(train_docs):
    seen = 0
    for d in train_docs:
        cap = parse_caption(d.texts[0])
        if not cap.relation:
            continue
        seen += 1
        a, b = (d.meta["objects"][k]["centroid"] for k in d.meta["refs"])
        gap = {"to the left of": b[0] - a[0], "to the right of": a[0] - b[0], "above": b[1] - a[1],
               "below": a[1] - b[1]}[cap.relation]
        assert gap >= REL_MARGIN + REL_SLACK
        assert score_image(d.images[0].pixels, cap)["relation"] is True  # measured on the pixels too
    assert seen > 20


def test_heldout_pairs_only_in_the_heldout_split():
    held_pairs, held_rels = set(HELDOUT_PAIRS), set(HELDOUT_RELATIONS)
    for d in make_documents(1500, seed=2, size=32):
        assert not {(o["colour"], o["shape"]) for o in d.meta["objects"]} & held_pairs
        cap = parse_caption(d.texts[0])
        assert (cap.nps[0].shape, cap.relation) not in held_rels
    kinds = set()
    for d in make_documents(40, seed=2, size=32, split="heldout"):
        kinds.add(d.meta["heldout"])
        cap = parse_caption(d.texts[0])
        if d.meta["heldout"] == "pair":
            assert {(o["colour"], o["shape"]) for o in d.meta["objects"]} & held_pairs
        else:
            assert (cap.nps[0].shape, cap.relation) in held_rels
    assert kinds == {"pair", "relation"}


def test_generation_is_deterministic():
    a, b = (list(make_documents(20, seed=5, size=32, split=s)) for s in ("train", "train"))
    c = list(make_documents(20, seed=6, size=32))
    assert [d.texts for d in a] == [d.texts for d in b] and [d.meta for d in a] == [d.meta for d in b]
    assert all(x.images[0].pixels.tobytes() == y.images[0].pixels.tobytes() for x, y in zip(a, b))
    assert [d.texts for d in a] != [d.texts for d in c]


def _red_circle_scene() -> Scene:
    obj = Obj("circle", "red", "large", "top left", PALETTE["red"], 0.30, (0.18, 0.19))
    return Scene((obj,), Background(128, textured=True, wave=(1.0, 0.5, 0.3), noise_seed=1))


@pytest.mark.parametrize("size", [32, 64])
def test_hand_made_scene_is_detected_exactly(size):
    (det,) = detect(render(_red_circle_scene(), size))
    assert (det["colour"], det["shape"], det["size"], det["cell"]) == ("red", "circle", "large", "top left")
    assert det["centroid"] == pytest.approx([0.18, 0.19], abs=0.01)
    assert det["extent"] == pytest.approx(0.30, abs=0.015)
    img = render(_red_circle_scene(), size)
    assert score_image(img, "a large red circle in the top left")["all_correct"]
    wrong = {"a large blue circle in the top left": "colour", "a small red circle": "size",
             "a large red square": "shape", "a red circle in the center": "position"}
    for text, fact in wrong.items():  # one wrong fact each: only that fact fails
        r = score_image(img, text)
        assert r[fact] is False and not r["all_correct"]
        assert all(r[t] in (True, None) for t in ("count", "colour", "shape", "size", "position") if t != fact)
    r = score_image(img, "a red circle and a blue square")  # the blue square is missing: its facts fail too
    assert (r["count"], r["colour"], r["shape"], r["n_correct"]["colour"]) == (False, False, False, 1)


def test_layout_overlap_by_hand():
    """Foreground IoU of paired images: the same render 1, a disjoint one 0, two empty canvases 1."""
    img = render(_red_circle_scene(), 32)
    fg = foreground(img)
    assert 0.05 < fg.mean() < 0.15                                         # a large circle: ~7 % of the canvas
    empty = np.full((32, 32, 3), 128, np.uint8)
    moved = np.asarray(img).copy()
    moved[:] = moved[16:, 16:].reshape(-1, 3)[0]                           # background colour everywhere
    moved[16:, 16:] = np.asarray(img)[:16, :16]                            # the circle's quadrant, moved
    assert layout_overlap([img], [img]) == 1.0 and layout_overlap([img], [moved]) == 0.0
    assert layout_overlap([empty, img], [empty, img]) == 1.0
    with pytest.raises(ValueError, match="equal"):
        layout_overlap([img], [])


@pytest.mark.parametrize("size", [32, 64])
def test_selfcheck_truth_perfect_shuffled_at_chance(size):
    r = selfcheck(100, size, seed=3, heldout_n=20)
    assert failures(r, tol=0.03) == []
    assert min(r["t2i_truth"]["accuracy"].values()) >= 0.99 and r["t2i_truth"]["all_correct"] >= 0.99
    assert r["t2i_shuffled"]["all_correct"] < 0.1 and r["t2i_shuffled"]["accuracy"]["colour"] < 0.4
    assert r["caption_truth"]["f1"] == 1.0 and r["caption_shuffled"]["f1"] < 0.5


def test_caption_precision_recall_by_hand():
    truth = [{"colour": "red", "shape": "circle", "size": "large", "cell": "top left", "centroid": [0.2, 0.2]},
             {"colour": "blue", "shape": "square", "size": "small", "cell": "bottom right", "centroid": [0.8, 0.8]}]
    ref = "a large red circle and a blue square"  # 6 facts: count, red, circle, large, blue, square
    # green is wrong; the position is true but the truth caption does not assert it: P = 6/7, R = 5/6.
    r = score_caption("a large green circle in the top left and a blue square", truth, ref)
    assert (r["precision"], r["recall"]) == pytest.approx((6 / 7, 5 / 6))
    assert r["f1"] == pytest.approx(60 / 71)
    # A true relation but no size: P = 6/6; recall misses "large": R = 5/6.
    r = score_caption("a red circle above a blue square", truth, ref)
    assert (r["precision"], r["recall"]) == pytest.approx((1.0, 5 / 6))
    assert score_caption("a red circle below a blue square", truth, ref)["precision"] == pytest.approx(5 / 6)
    assert score_caption(ref, truth, ref)["f1"] == 1.0
    assert score_caption("a red circle.", truth, ref) | {"truth": None} == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "parsed": False, "gen": {}, "gen_true": {}, "truth": None,
        "recalled": {}}
    # an extra NP that matches nothing: its colour and shape are false and the count is wrong
    r = score_objects("a red circle, a blue square and a green star", truth)
    assert r["count"] is False and r["colour"] is False and r["n_correct"]["colour"] == 2


def _members(out_dir, split):
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
            for s in iter_raw_samples(shard_paths(out_dir, split))]


def test_language_texts_spell_every_word_and_keep_the_heldout_out():
    """language.txt (written beside the shards): every word of the grammar, every form, all parseable, and no
    held-out colour-shape pair or held-out subject-relation pair."""
    from data_tools.shapes import (CELLS, COLOURS, HELDOUT_PAIRS, HELDOUT_RELATIONS, RELATIONS, SHAPES, SIZES,
                                   language_texts)

    texts = language_texts()
    words = {w for t in texts for w in t.replace(",", " ,").split()}
    grammar = ({*COLOURS, *SHAPES, *SIZES, "a", "an", "in", "the", "and", ","}
               | {w for phrase in (*CELLS, *RELATIONS) for w in phrase.split()})
    assert words == grammar
    caps = [parse_caption(t) for t in texts]
    assert {len(c.nps) for c in caps} == {1, 2, 3} and {c.relation for c in caps} == {None, *RELATIONS}
    assert not any((n.colour, n.shape) in HELDOUT_PAIRS for c in caps for n in c.nps)
    assert not any(c.relation and (c.nps[0].shape, c.relation) in HELDOUT_RELATIONS for c in caps)


def test_shard_job_end_to_end(tmp_path, capsys):
    args = ["--n", "30", "--size", "32", "--heldout-n", "6", "--max-per-shard", "8", "--seed", "4"]
    assert shapes_main(["--out", str(tmp_path / "a")] + args) == 0
    assert "train: 30 docs in 4 shard(s)" in capsys.readouterr().out
    from data_tools.shapes import language_texts
    assert (tmp_path / "a" / "language.txt").read_text().splitlines() == language_texts()
    assert len(shard_paths(tmp_path / "a", "train")) == 4 and len(shard_paths(tmp_path / "a", "heldout")) == 1
    docs = [decode_document(s) for s in iter_raw_samples(shard_paths(tmp_path / "a", "train"))]
    assert len(docs) == 30 and all(d.is_pair() and d.images[0].pixels.size == (32, 32) for d in docs)
    for d in docs:
        assert score_image(d.images[0].pixels, d.texts[0])["all_correct"]  # truth travels intact in the shards
    # Tar headers carry the write time, so shards are not byte-identical; every member is.
    assert shapes_main(["--out", str(tmp_path / "b")] + args) == 0
    for split in ("train", "heldout"):
        assert _members(tmp_path / "a", split) == _members(tmp_path / "b", split)


def test_overfit_job_end_to_end(tmp_path, capsys):
    # the plumbing of `nextx eval overfit` on a 2-image, 4-step run: the IMM k curriculum reaches the trainer and
    # the report, which carries the MSEs beside their baselines and the caption matches
    from evals.overfit import main
    with pytest.raises(SystemExit):
        main(["--k-ramp", "1.5"])
    assert "--k-ramp must be a fraction" in capsys.readouterr().err
    out = tmp_path / "of"
    assert main(["--out", str(out), "--n-images", "2", "--steps", "4", "--k-ramp", "0.5", "model.d_model=32",
                 "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=1", "model.time_freq_dim=32",
                 "data.batch_rows=2", "data.num_workers=0", "train.log_every=1", "train.threads=1"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["objective"] == "imm" and r["k_ramp_steps"] == 2 and r["k"] == 12 and r["train_steps"] == 4
    assert r["n_images"] == 2 and 0 <= r["caption_exact_match"] <= 1 and len(r["captions"]) == 2
    for key in ("mse_1_step", "mse_2_step", "mse_noise_baseline", "mse_other_image_baseline"):
        assert math.isfinite(r[key]) and r[key] > 0
    ks = [json.loads(line).get("k") for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [k for k in ks if k is not None][:4] == [0.0, 6.0, 12.0, 12.0]
    assert (out / "overfit_grid.png").exists()


def test_scorer_holds_under_blur_and_patch_noise():
    """Generated images are soft-edged and patchy: the scorer reads blurred (radius 1) and patch-noised renders of
    exact scenes (bench/scorer_robustness.py measures 300 scenes: shape and size 1.000 under blur r=1)."""
    import sys
    from pathlib import Path

    from PIL import ImageFilter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from scorer_robustness import patch_noise

    from data_tools.shapes import make_documents
    from evals.shapes_score import score_t2i

    docs = list(make_documents(40, 5, 32, "train"))
    caps = [d.texts[0] for d in docs]
    rng = np.random.default_rng(0)
    blurred = score_t2i([d.images[0].pixels.convert("RGB").filter(ImageFilter.GaussianBlur(1)) for d in docs], caps)
    noisy = score_t2i([patch_noise(d.images[0].pixels.convert("RGB"), 8, 4, rng) for d in docs], caps)
    for r in (blurred, noisy):
        assert r["accuracy"]["shape"] >= 0.95 and r["accuracy"]["size"] >= 0.95 and r["all_correct"] >= 0.9, r


def test_single_outcome_tells_the_failures_of_exactly_one_apart():
    from evals.shapes_score import OUTCOMES, aggregate_t2i, score_objects, single_outcome

    red = {"colour": "red", "shape": "circle", "size": "large", "cell": "top left", "centroid": [0.2, 0.2]}
    blue = {"colour": "blue", "shape": "square", "size": "small", "cell": "center", "centroid": [0.5, 0.5]}
    assert single_outcome("a red circle", []) == "none"
    assert single_outcome("a red circle", [red]) == "one, its colour"
    assert single_outcome("a small red circle in the top left", [blue]) == "one, another colour"
    assert single_outcome("a red circle", [blue, red]) == "several, its colour among them"
    assert single_outcome("a red circle", [blue, blue]) == "several, not its colour"
    assert single_outcome("a red circle and a blue square", [red, blue]) is None
    objs = [[red], [red, blue], [], [blue], [red, blue]]
    caps = ["a red circle", "a red circle", "a red circle", "a red circle", "a red circle and a blue square"]
    agg = aggregate_t2i([score_objects(c, o) for c, o in zip(caps, objs)], caps)
    assert agg["single_outcomes"] == {OUTCOMES[0]: .25, OUTCOMES[1]: .25, OUTCOMES[2]: .25, OUTCOMES[3]: 0.0,
                                      OUTCOMES[4]: .25}
    assert agg["by_objects"][1]["accuracy"]["count"] == .5     # "exactly one" is the first two outcomes
    # exactly one, apart for prompts that state the cell and prompts that do not (2-object prompts not counted)
    caps2 = ["a red circle in the top left", "a red circle", "a red circle", "a red circle in the center",
             "a red circle and a blue square"]
    agg2 = aggregate_t2i([score_objects(c, o) for c, o in zip(caps2, objs)], caps2)
    assert agg2["single_one_by_cell"] == {"cell stated": {"n": 2, "one": 1.0}, "no cell": {"n": 2, "one": 0.0}}
    agg3 = aggregate_t2i([score_objects(c, o) for c, o in zip(caps2[:1], objs[:1])], caps2[:1])
    assert agg3["single_one_by_cell"] == {"cell stated": {"n": 1, "one": 1.0}}      # an empty kind is left out
