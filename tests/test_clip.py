"""CLIP alignment (evals/clip_align.py) and the in-domain CLIP (`nextx clip train`): CLIPScore equals open_clip's own
computation, the saved model loads with open_clip alone in a fresh process, missing weights are a clear error."""

import json
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from data_tools.shapes import main as shapes_main
    from evals.clip_train import main as clip_main

    root = tmp_path_factory.mktemp("clip")
    assert shapes_main(["--out", str(root / "shapes"), "--n", "96", "--heldout-n", "24"]) == 0
    assert clip_main(["--shards", str(root / "shapes"), "--out", str(root / "clip"), "--steps", "6", "--batch", "16",
                      "--width", "32", "--layers", "1", "--embed-dim", "16", "--save-every", "3",
                      "--threads", "1"]) == 0
    return root


def test_clipscore_equals_open_clip_directly(clip_dir):
    """nextx's CLIPScore against a by-hand open_clip computation in a fresh interpreter (its own preprocessing and
    tokenizer, loaded by name from the registered config), on the same images and texts."""
    from PIL import Image

    from evals.clip_align import Clip, retrieval_recall

    imgs = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    texts = ["a red circle", "a green square in the center", "a blue star"]
    for i, im in enumerate(imgs):
        im.save(clip_dir / f"im{i}.png")
    ours = Clip.load(str(clip_dir / "clip")).score(imgs, texts)
    code = f"""
import json, torch, open_clip
from PIL import Image
d = {str(clip_dir / "clip")!r}
open_clip.add_model_config(d + "/nextx-clip.json")
model, _, pre = open_clip.create_model_and_transforms("nextx-clip", pretrained=d + "/open_clip_model.safetensors")
tok = open_clip.get_tokenizer("nextx-clip")
with torch.no_grad():
    x = torch.stack([pre(Image.open({str(clip_dir)!r} + f"/im{{i}}.png")) for i in range(3)])
    fi = model.encode_image(x); ft = model.encode_text(tok({texts!r}))
    fi = fi / fi.norm(dim=-1, keepdim=True); ft = ft / ft.norm(dim=-1, keepdim=True)
    print(json.dumps((100 * (fi * ft).sum(-1).clamp(min=0)).tolist()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)
    assert ((ours >= 0) & (ours <= 100)).all()
    r = retrieval_recall(torch.eye(4), torch.eye(4))
    assert r["t2i@1"] == r["i2t@1"] == 1.0 and r["chance@1"] == 0.25


def test_clip_train_resumes_and_reports(clip_dir):
    from evals.clip_train import main as clip_main

    rep = json.loads((clip_dir / "clip" / "clip_eval.json").read_text())
    assert rep["steps"] == 6 and rep["heldout_pairs"] > 0 and set(rep["heldout"]) >= {"t2i@1", "i2t@5", "chance@1"}
    state = torch.load(clip_dir / "clip" / "train_state.pt", weights_only=False)
    assert state["step"] == 6
    assert clip_main(["--shards", str(clip_dir / "shapes"), "--out", str(clip_dir / "clip"), "--steps", "8",
                      "--batch", "16", "--width", "32", "--layers", "1", "--embed-dim", "16", "--threads", "1"]) == 0
    assert json.loads((clip_dir / "clip" / "clip_eval.json").read_text())["steps"] == 8


def test_missing_weights_say_how_to_make_them(tmp_path):
    from evals.clip_align import Clip

    with pytest.raises(FileNotFoundError, match="nextx clip train"):
        Clip.load("ViT-B-32", pretrained=str(tmp_path / "nope.bin"))
    with pytest.raises(FileNotFoundError, match="nextx clip train"):
        Clip.load(str(tmp_path))


def test_change_one_fact_changes_exactly_that_fact():
    import random

    from data_tools.shapes import parse_caption
    from evals.clip_align import change_one_fact

    rng = random.Random(0)
    cap = "a small purple heart in the top middle and a red circle"
    a = parse_caption(cap)
    for fact, field in (("colour", "colour"), ("shape", "shape"), ("position", "cell")):
        b = parse_caption(change_one_fact(cap, fact, rng))
        assert getattr(b.nps[0], field) != getattr(a.nps[0], field)
        for f in ("colour", "shape", "size", "cell"):
            if f != field:
                assert getattr(b.nps[0], f) == getattr(a.nps[0], f)
        assert b.nps[1] == a.nps[1]
    assert change_one_fact(cap, "count", rng) == "a small purple heart in the top middle"
    assert len(parse_caption(change_one_fact("a red circle", "count", rng)).nps) == 2
    assert change_one_fact("a red circle", "position", rng) is None


def test_frechet_distance_in_clip_features(clip_dir):
    """FD of a set against itself is ~0; the floor (half vs half of the real images) sits below the ceiling (real vs
    noise)."""
    from PIL import Image

    from evals.clip_align import Clip, fd_floor_ceiling, frechet_distance

    clip = Clip.load(str(clip_dir / "clip"))
    real = [Image.new("RGB", (32, 32), (int(c), 128, 255 - int(c))) for c in torch.linspace(0, 255, 24)]
    assert abs(frechet_distance(clip, real, real)) < 1e-6
    ref = fd_floor_ceiling(clip, real)
    assert 0 <= ref["floor_real_vs_real"] < ref["ceiling_real_vs_noise"]
    assert abs(fd_floor_ceiling(clip, real, reference=list(real))["floor_real_vs_real"]) < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(clip, real[:1], real)


def _tiny_bert(d):
    """A randomly initialised 1-layer BERT with a word-level vocabulary of the shapes language, saved as a local
    Hugging Face folder (what `--lit-text` reads; the real run uses all-MiniLM-L6-v2)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from data_tools.shapes import CELLS, COLOURS, RELATIONS, SHAPES, SIZES

    words = sorted({w for phrase in (*CELLS, *RELATIONS) for w in phrase.split()} | set(COLOURS) | set(SHAPES)
                   | set(SIZES) | {"a", "an", "and", ",", "in", "the"})
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(d))


def test_lit_text_tower_is_frozen_and_the_folder_loads_alone(clip_dir, tmp_path):
    """LiT: the pretrained text tower's weights leave training unchanged, its projection and the image tower
    move; the output folder loads with open_clip alone in a fresh process (tokenizer and config copied in) and
    gives the same embeddings as nextx's loader."""
    from safetensors.torch import load_file
    from transformers import BertModel

    from evals.clip_align import Clip
    from evals.clip_train import main as clip_main

    _tiny_bert(tmp_path / "bert")
    out = tmp_path / "lit"
    from nextx.errors import UserError

    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        clip_main(["--shards", str(clip_dir / "shapes"), "--out", str(out), "--lit-text", str(tmp_path)])
    assert clip_main(["--shards", str(clip_dir / "shapes"), "--out", str(out), "--steps", "4", "--batch", "16",
                      "--width", "32", "--layers", "1", "--embed-dim", "16", "--threads", "1", "--lr", "1e-2",
                      "--lit-text", str(tmp_path / "bert")]) == 0
    sd = load_file(str(out / "open_clip_model.safetensors"))
    bert = BertModel.from_pretrained(str(tmp_path / "bert")).state_dict()
    tower = {k[len("text.transformer."):]: v for k, v in sd.items() if k.startswith("text.transformer.")}
    assert tower and all(torch.equal(tower[k], bert[k]) for k in tower if k in bert)
    assert {k for k in bert if not k.startswith("pooler.")} <= set(tower)     # BERT's own pooler is not used
    init = json.loads((out / "clip_eval.json").read_text())
    assert init["steps"] == 4 and "t2i@1" in init["heldout"]
    texts = ["a red circle", "a small blue star in the center"]
    ours = Clip.load(str(out)).texts(texts)
    code = f"""
import json, torch, open_clip
model, _, pre = open_clip.create_model_and_transforms("local-dir:{out}")
model.eval()
tok = open_clip.get_tokenizer("local-dir:{out}")
with torch.no_grad():
    f = model.encode_text(tok({texts!r}), normalize=True)
print(json.dumps(f.tolist()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.allclose(ours, torch.tensor(json.loads(r.stdout.strip().splitlines()[-1])), atol=1e-5)


def test_rank_correlation_by_hand():
    """Spearman by hand: ranks (1, 2, 3, 4) vs (2, 1, 4, 3): 1 - 6 * 4 / (4 * 15) = 0.6; ties share their mean rank."""
    from evals.clip_align import rank_correlation

    assert rank_correlation([10, 20, 30, 40], [2, 1, 4, 3]) == pytest.approx(0.6, abs=1e-5)
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-5)
    # ties: b's ranks (1.5, 1.5, 3) against (1, 2, 3): Pearson of the ranks = 0.8660
    assert rank_correlation([1, 2, 3], [0, 0, 5]) == pytest.approx(0.8660254, abs=1e-5)
