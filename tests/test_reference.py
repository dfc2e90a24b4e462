"""The calibration reference (`nextx eval reference`), the per-object-count scores and the labelled grid."""

import json

import numpy as np
import pytest

from data_tools.shapes import GAP, make_documents, parse_caption, parse_weights
from data_tools.shapes import main as shapes_main
from evals.shapes_eval import grid_columns, labelled_grid, score_with_chance
from nextx.cli import _call
from nextx.documents import decode_document, iter_raw_samples, shard_paths


def test_object_weights_change_train_scenes_only():
    ones = list(make_documents(60, seed=3, size=32, object_weights=(1, 0, 0)))
    assert all(len(d.meta["objects"]) == 1 for d in ones)
    mix = [len(d.meta["objects"]) for d in make_documents(300, seed=3, size=32, object_weights=(2, 1, 1))]
    assert 0.40 < mix.count(1) / 300 < 0.60 and mix.count(3) > 0           # 1/2 single-object, by weight
    default = [d.texts[0] for d in make_documents(20, seed=3, size=32)]
    assert default == [d.texts[0] for d in make_documents(20, seed=3, size=32, object_weights=None)]
    held = [d.texts[0] for d in make_documents(20, seed=3, size=32, split="heldout")]
    assert held == [d.texts[0] for d in make_documents(20, seed=3, size=32, split="heldout", object_weights=(1, 0, 0))]
    for bad in ((1, 1), (-1, 1, 1), (0, 0, 0)):
        with pytest.raises(ValueError, match="object_weights"):
            next(make_documents(1, object_weights=bad))
    assert parse_weights("2,1,1") == (2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="three"):
        parse_weights("2,x,1")


def test_position_rate_changes_train_captions_only():
    """--position-rate 1: every train caption without a relation states each object's cell; 0: none does; the
    held-out prompts are the same whatever the rate; out of [0, 1] is refused."""
    caps = {r: [parse_caption(d.texts[0]) for d in make_documents(80, seed=4, size=32, position_rate=r)]
            for r in (0.0, 1.0)}
    plain = [c for c in caps[1.0] if c.relation is None]
    assert plain and all(n.cell is not None for c in plain for n in c.nps)
    assert all(n.cell is None for c in caps[0.0] for n in c.nps)
    held = [d.texts[0] for d in make_documents(20, seed=4, size=32, split="heldout")]
    assert held == [d.texts[0] for d in make_documents(20, seed=4, size=32, split="heldout", position_rate=1.0)]
    with pytest.raises(ValueError, match="position_rate"):
        next(make_documents(1, position_rate=1.5))


def test_position_jitter_centres_train_objects_only():
    """--position-jitter 0: every train object's centroid lies in the middle of its cell's allowed range (the cell
    centre for the middle cell), so all train scenes of one cell and shape put it at one place; 1 is the default's
    exact scenes; the held-out split is the same whatever the jitter; out of [0, 1] is refused."""
    def centres(j, split="train"):
        return [(o["cell"], o["centroid"]) for d in make_documents(200, seed=6, size=32, split=split,
                                                                     object_weights=(1, 0, 0), position_jitter=j)
                for o in d.meta["objects"]]
    still = centres(0.0)
    by_cell: dict = {}
    for cell, c in still:
        by_cell.setdefault(cell, []).append(c)
    assert len(by_cell) == 9
    for cell, cs in by_cell.items():     # at the border the box's extent and offset move the middle of the range
        spread = np.ptp(np.asarray(cs), axis=0)
        assert spread.max() < 0.07, (cell, spread)
    assert np.allclose(by_cell["center"], 0.5)                                     # the centre: exactly
    moving = centres(1.0)
    assert moving == [(o["cell"], o["centroid"]) for d in make_documents(200, seed=6, size=32, object_weights=(1, 0, 0))
                      for o in d.meta["objects"]]                                       # the default, exactly
    assert np.ptp(np.asarray([c for cell, c in moving if cell == "center"]), axis=0).min() > 0.1
    assert centres(0.0, "heldout") == centres(1.0, "heldout")
    for d in make_documents(30, seed=6, size=32, object_weights=(0, 0, 1), position_jitter=0.0):  # still apart
        boxes = [o["box"] for o in d.meta["objects"]]
        assert len(boxes) == 3 and all(max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= GAP - 1e-4
                                       for i, a in enumerate(boxes) for b in boxes[i + 1:])
    with pytest.raises(ValueError, match="position_jitter"):
        next(make_documents(1, position_jitter=1.5))


def test_scores_per_object_count_on_ground_truth():
    docs = list(make_documents(40, seed=5, size=32, split="heldout"))
    ims, caps = [d.images[0].pixels for d in docs], [d.texts[0] for d in docs]
    r = score_with_chance(ims, caps, seed=0)
    assert r["accuracy"]["colour"] == 1.0 and r["all_correct"] == 1.0
    n_obj = [len(parse_caption(c).nps) for c in caps]
    assert sorted(r["by_objects"]) == sorted(set(n_obj))
    assert sum(v["n"] for v in r["by_objects"].values()) == len(caps)
    for n, v in r["by_objects"].items():
        assert v["n"] == n_obj.count(n) and v["all_correct"] == 1.0 and v["accuracy"]["count"] == 1.0
        assert v["chance_accuracy"]["count"] == 1.0          # shuffled among prompts with the same count
    cols = grid_columns(caps, 6)
    assert len(cols) == 6 and [n_obj[i] for i in cols] == sorted(n_obj[i] for i in cols)
    g = labelled_grid([[ims[i] for i in cols]] * 2, [caps[i] for i in cols], ["1 step", "2 steps"], scale=3)
    assert g.size[0] == 60 + 6 * (96 + 4) and g.size[1] > 2 * (96 + 4)


def test_reference_end_to_end(tmp_path, capsys):
    shards = tmp_path / "shapes"
    # single-object training scenes: the held-out prompts (1-3 objects) are longer than every training caption
    assert shapes_main(["--out", str(shards), "--n", "40", "--heldout-n", "6", "--object-weights", "1,0,0"]) == 0
    assert _call("tokenizers/text/train_spm.py", ["--shards", str(shards), "--out", str(tmp_path / "text"),
                                                  "--vocab-size", "128"], "t") == 0
    assert _call("tokenizers/image/pixel_stats.py", ["--shards", str(shards), "--out", str(tmp_path / "pix"),
                                                     "--image-size", "32", "--patch-size", "8"], "p") == 0
    from evals.reference import main

    out = tmp_path / "ref"
    assert main(["--shards", str(shards), "--text-tokenizer", str(tmp_path / "text"), "--image-tokenizer",
                 str(tmp_path / "pix"), "--out", str(out), "--minutes", "0.02", "--batch", "8", "--width", "32",
                 "--depth", "1", "--threads", "1", "--steps", "1,2", "--n", "6"]) == 0
    r = json.loads((out / "reference.json").read_text())
    assert r["steps"] >= 1 and r["images_seen"] == 8 * r["steps"] and r["n"] == 6
    assert set(r["t2i"]) == {"1", "2"} and all(np.isfinite(v) for v in r["t2i"]["2"]["accuracy"].values())
    assert (out / "reference_grid.png").exists() and (out / "reference.pt").exists()
    assert "images/s" in capsys.readouterr().out
    assert r["precision"] == "fp32"
    # the diagnostic variants: caption pooled into adaLN, the true attributes as the condition, shifted times, bf16
    for extra in (["--cond", "pooled"], ["--cond", "both", "--condition", "attributes", "--t-shift", "3"],
                  ["--precision", "bf16"], ["--pixel-unet", "4", "--snapshots", "0,0.001"]):
        assert main(["--shards", str(shards), "--text-tokenizer", str(tmp_path / "text"), "--image-tokenizer",
                     str(tmp_path / "pix"), "--out", str(out / extra[1]), "--minutes", "0.01", "--batch", "4",
                     "--width", "32", "--depth", "1", "--threads", "1", "--steps", "1", "--n", "3", *extra]) == 0
        r = json.loads((out / extra[1] / "reference.json").read_text())
        assert r["t2i"]["1"]["n"] == 3 and r["precision"] == ("bf16" if "bf16" in extra else "fp32")
        assert list(r["snapshots"]) == (["0.0", "0.001"] if "--snapshots" in extra else [])
        if "--snapshots" in extra:   # scored before any step: the clock stops while the EMA weights draw
            assert r["snapshots"]["0.0"]["train_steps"] == 0 and r["snapshots"]["0.0"]["t2i"]["1"]["n"] == 3
    for bad, msg in (("5", "must lie in"), ("a,b", "comma-separated")):    # a snapshot that could never be taken
        with pytest.raises(SystemExit, match=msg):
            main(["--shards", str(shards), "--text-tokenizer", str(tmp_path / "text"), "--image-tokenizer",
                  str(tmp_path / "pix"), "--out", str(out / "bad"), "--minutes", "0.01", "--snapshots", bad])
    # prompts from the held-out split of another shard set (trained on the first): its 5 scenes, not the first's 6
    other = tmp_path / "other"
    assert shapes_main(["--out", str(other), "--n", "10", "--heldout-n", "5", "--seed", "1"]) == 0
    assert main(["--shards", str(shards), "--heldout-shards", str(other), "--text-tokenizer", str(tmp_path / "text"),
                 "--image-tokenizer", str(tmp_path / "pix"), "--out", str(out / "other"), "--minutes", "0.01",
                 "--batch", "4", "--width", "32", "--depth", "1", "--threads", "1", "--steps", "1", "--n", "6"]) == 0
    r = json.loads((out / "other" / "reference.json").read_text())
    held = [decode_document(raw).texts[0] for raw in iter_raw_samples(shard_paths(str(other), "heldout"))]
    assert r["n"] == 5 and r["prompts"] == held and r["heldout_shards"] == str(other)


def test_reference_attribute_ids_and_time_shift():
    import torch

    from evals.reference import _attribute_ids
    from nextx.imm import shift_time

    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_time(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))  # 3t / (1 + 2t), by hand
    assert torch.equal(shift_time(t, 1.0), t)
    doc = next(make_documents(1, seed=3, size=32, object_weights=(0, 1, 0)))
    ids = _attribute_ids(doc)
    assert len(ids) == 8 and len(set(ids[:4])) == 4 and min(ids) >= 4           # 4 per object, disjoint ranges


def test_attention_locality_by_hand():
    import math

    import torch

    from evals.attention_locality import locality

    N = 6                                                    # a 2x3 grid; 2 caption keys before the image keys
    uniform = torch.zeros(1, 1, N, 2 + N)
    uniform[..., 2:] = 0.5 / N
    uniform[..., :2] = 0.25
    r = locality(uniform, (2, 3))
    assert r["mass"] == pytest.approx(0.5) and r["entropy"] == pytest.approx(math.log(N), abs=1e-5)
    assert r["distance"] == pytest.approx(r["distance_uniform"]) and r["distance_uniform"] == pytest.approx(
        sum(abs(a // 3 - b // 3) + abs(a % 3 - b % 3) for a in range(N) for b in range(N)) / N ** 2)
    self_only = torch.zeros(1, 1, N, 2 + N)
    self_only[0, 0, torch.arange(N), 2 + torch.arange(N)] = 1.0
    r = locality(self_only, (2, 3))
    assert r["mass"] == 1.0 and r["entropy"] == pytest.approx(0.0, abs=1e-6) and r["distance"] == 0.0
