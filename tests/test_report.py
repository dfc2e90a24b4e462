"""`nextx eval report` (evals/report.py) and the trainer's periodic report: held-out text perplexity equals a hand-
rolled causal forward of the caption, the report of an IMM and a flow run has every section, plots and grids, and a
training with train.report_every writes the same report and its figures into metrics.jsonl."""

import json
import math

import pytest
import torch

from data_tools.shapes import main as shapes_main
from nextx.cli import _call

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=1", "model.time_freq_dim=32",
        "data.batch_rows=2", "data.num_workers=0", "data.row_len=128", "data.max_text_tokens=40", "train.log_every=1",
        "train.threads=1", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from nextx.train import main as train_main

    root = tmp_path_factory.mktemp("report")
    shards = root / "shapes"
    assert shapes_main(["--out", str(shards), "--n", "40", "--heldout-n", "8"]) == 0
    assert _call("tokenizers/text/train_spm.py", ["--shards", str(shards), "--out", str(root / "text"),
                                                  "--vocab-size", "128"], "t") == 0
    assert _call("tokenizers/image/pixel_stats.py", ["--shards", str(shards), "--out", str(root / "pix"),
                                                     "--image-size", "32", "--patch-size", "8"], "p") == 0
    data = [f"data.train_shards={shards}", f"data.val_shards={shards}", f"data.text_tokenizer={root / 'text'}",
            f"data.image_tokenizer={root / 'pix'}", f"run_dir={root / 'runs'}"]
    for name, kind in (("imm", "imm"), ("flow", "flow")):
        extra = ["train.report_every=2", "train.report_prompts=4"] if kind == "imm" else []
        assert train_main(["configs/tiny.yaml", f"name={name}", f"objective.kind={kind}", "train.steps=2",
                           *TINY, *data, *extra]) == 0
    return root


def test_caption_perplexity_equals_a_plain_causal_forward(runs):
    """caption_alone is <bos> caption <boi> with nothing else: its NLL must equal a causal text-only forward of
    those ids written by hand (no layout, packing, mask builder or objective involved)."""
    from evals.report import text_perplexity
    from evals.shapes_eval import held_out_docs
    from nextx.checkpoint import load_for_inference
    from nextx.model import ModelInput
    from nextx.sequence import TEXT

    model, cfg, text_tok, image_tok, special = load_for_inference(runs / "runs" / "imm")
    docs = held_out_docs(cfg, 5)
    got = text_perplexity(model, cfg, text_tok, image_tok, special, docs, batch_rows=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([[special.bos, *text_tok.encode(d.texts[0]), special.boi]])
            T = ids.shape[1]
            inp = ModelInput(ids, torch.full_like(ids, TEXT, dtype=torch.int8), torch.arange(T)[None],
                             torch.zeros(1, T, 2, dtype=torch.long), torch.zeros(1, T, image_tok.token_dim),
                             torch.full_like(ids, -1), torch.zeros(0), torch.zeros(0),
                             torch.ones(T, T, dtype=torch.bool).tril()[None, None])
            logits = model(inp).text_logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += T - 1
    assert got["caption_alone"]["tokens"] == n
    assert got["caption_alone"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    given = got["caption_given_image"]
    assert given["tokens"] == n + len(docs)  # the caption and <eos>, and <bos> -> <boi>, per document
    assert math.isfinite(given["perplexity"]) and given["perplexity"] != got["caption_alone"]["perplexity"]


def test_report_of_imm_and_flow_runs(runs, capsys):
    from evals.report import main

    out = runs / "rep"
    assert main([str(runs / "runs" / "imm"), "--flow", str(runs / "runs" / "flow"), "--n", "6", "--steps", "1,2",
                 "--flow-steps", "2,3", "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert set(r["models"]) == {"imm", "flow"} and r["settings"]["n"] == 6
    assert set(r["models"]["imm"]["t2i"]) == {"1", "2"} and set(r["models"]["flow"]["t2i"]) == {"2", "3"}
    for sec in r["models"].values():
        assert sec["perplexity"]["caption_alone"]["perplexity"] > 1
        for k in sec["t2i"].values():
            assert k["latency_s_per_image"] > 0 and 0 <= k["all_correct"] <= 1 and "count" in k["accuracy"]
    md = (out / "report.md").read_text()
    assert "| imm | 1 | all 6 |" in md and "perplexity, caption alone" in md and "all facts" in md
    for f in ("score_vs_steps_and_latency.png", "imm/t2i_grid.png", "flow/t2i_grid.png"):
        assert (out / f).stat().st_size > 1000
    from nextx.errors import UserError

    with pytest.raises(UserError, match="objective.kind=flow"):
        main([str(runs / "runs" / "flow"), "--n", "2", "--out", str(runs / "bad")])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([str(runs / "runs" / "imm"), "--steps", "0,1"])
    assert "--steps must be step counts >= 1" in capsys.readouterr().err


def test_trainer_report_writes_the_same_report(runs):
    d = runs / "runs" / "imm" / "reports" / "step_0000002"
    r = json.loads((d / "report.json").read_text())
    assert set(r["models"]["imm"]["t2i"]) == {"1", "2", "4", "8"} and r["settings"]["n"] == 4
    assert (d / "report.md").exists() and (d / "score_vs_steps_and_latency.png").exists()
    rows = [json.loads(x) for x in (runs / "runs" / "imm" / "metrics.jsonl").read_text().splitlines()]
    rep = [x for x in rows if "report_all_facts@4" in x]
    assert len(rep) == 1 and rep[0]["step"] == 2 and rep[0]["report_ppl_caption_alone"] > 1


def test_report_needs_val_shards():
    from nextx.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.report_every"):
        load_config("configs/tiny.yaml", ["train.report_every=5", "data.val_shards="])


def test_eval_shapes_layout_reports_both_overlaps(runs, capsys):
    """`nextx eval shapes --layout`: per step count, the foreground IoU of the same noise under other prompts and of
    the same prompts from other noise, each in [0, 1], beside two real scenes; printed in the table."""
    from evals.shapes_eval import main

    out = runs / "layout"
    assert main([str(runs / "runs" / "imm"), "--n", "4", "--steps", "1", "--layout", "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    lay = r["t2i"]["1"]["layout"]
    assert set(lay) == {"same_noise_other_prompt", "same_prompt_other_noise"}
    assert all(0.0 <= v <= 1.0 for v in lay.values()) and 0.0 <= r["layout_real_other_scene"] <= 1.0
    assert "what decides the layout" in capsys.readouterr().out


def test_eval_shapes_without_captions_and_the_unknown_word_warning(runs, capsys):
    """`--no-captions` draws and scores only (no caption section); prompts holding <unk> are counted, and any such
    count is a printed warning (a tokenizer trained on single-object captions cannot spell "above")."""
    from evals.shapes_eval import format_table, main
    from nextx.checkpoint import load_for_inference

    out = runs / "nocap"
    assert main([str(runs / "runs" / "imm"), "--n", "4", "--steps", "1", "--no-captions", "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    printed = capsys.readouterr().out
    assert r["caption"] is None and "captioning:" not in printed and r["t2i"]["1"]["by_objects"]
    _, _, tok, _, _ = load_for_inference(runs / "runs" / "imm")
    from evals.shapes_eval import held_out_docs
    from nextx.checkpoint import load_run_config, resolve

    docs = held_out_docs(load_run_config(resolve(runs / "runs" / "imm") / "config.yaml"), 4)
    assert r["unknown_token_prompts"] == sum(tok.unk_id in tok.encode(d.texts[0]) for d in docs)
    assert "WARNING" not in format_table({**r, "unknown_token_prompts": 0})
    assert "WARNING: 3 of 4 prompts hold <unk>" in format_table({**r, "unknown_token_prompts": 3})
    # what was drawn for the one-object prompts: shares summing to 1, printed, kept once (not per object count)
    outs = r["t2i"]["1"]["single_outcomes"]
    n1 = sum(len(d.meta["objects"]) == 1 for d in docs)
    assert (abs(sum(outs.values()) - 1) < 1e-9) if n1 else outs == {}
    assert ("what was drawn for the one-object prompts" in printed) == bool(n1)
    assert all("single_outcomes" not in rn for rn in r["t2i"]["1"]["by_objects"].values())
    by_cell = r["t2i"]["1"]["single_one_by_cell"]
    assert sum(b["n"] for b in by_cell.values()) == n1
    for kind, b in by_cell.items():
        assert f"exactly one, {kind} ({b['n']}): {b['one']:.2f}" in printed


def test_eval_shapes_complete_scores_the_prompt_and_shows_the_words(runs, capsys):
    """`--complete N`: the model first finishes each prompt (at most N tokens), then draws; eval.json keeps the
    prompts and what was written (one string each), the table says so, and the scores are of the prompts' own facts
    (the chance rows are the same images against shuffled prompts)."""
    from evals.shapes_eval import main

    out = runs / "complete"
    assert main([str(runs / "runs" / "imm"), "--n", "4", "--steps", "1,2", "--no-captions", "--complete", "3",
                 "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["complete"] == 3 and r["temperature"] == 1.0 and len(r["prompts"]) == len(r["written"]) == 4
    assert all(isinstance(w, str) and len(w.split()) <= 3 for w in r["written"])
    assert "each prompt first finished by the model in up to 3 tokens" in capsys.readouterr().out
    assert (out / "t2i_grid.png").is_file() and r["t2i"]["1"]["n"] == 4
    with pytest.raises(SystemExit):
        main([str(runs / "runs" / "imm"), "--complete", "-1"])


def test_eval_shapes_compose_draws_noun_phrases(runs, capsys):
    """`--compose`: a prompt of several objects is given to the model as its noun phrases (relation dropped), each
    completed on its own with --complete; eval.json keeps what was drawn and written per prompt."""
    from data_tools.shapes import noun_phrases
    from evals.shapes_eval import main

    assert noun_phrases("a red circle above a small blue square") == ["a red circle", "a small blue square"]
    assert noun_phrases("a red circle in the top left, a blue ring and a large green star") == \
        ["a red circle in the top left", "a blue ring", "a large green star"]
    assert noun_phrases("a white diamond") == "a white diamond"
    out = runs / "compose"
    assert main([str(runs / "runs" / "imm"), "--n", "4", "--steps", "1", "--no-captions", "--compose", "--complete",
                 "2", "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["compose"] and len(r["drawn_as"]) == 4 and any(isinstance(d, list) for d in r["drawn_as"])
    for d, w, p in zip(r["drawn_as"], r["written"], r["prompts"]):
        assert (d == p and isinstance(w, str)) or (d == noun_phrases(p) and len(w) == len(d))
    assert "drawn as its noun phrases composed" in capsys.readouterr().out
    out = runs / "regions"
    assert main([str(runs / "runs" / "imm"), "--n", "4", "--steps", "1", "--no-captions", "--compose", "--complete",
                 "2", "--regions", "--best-of", "2", "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    printed = capsys.readouterr().out
    assert r["regions"] and r["compose"] and "each part guiding the cell its words name" in printed
    assert r["best_of"] == 2 and "the best of 2 images" in printed
    with pytest.raises(SystemExit):
        main([str(runs / "runs" / "imm"), "--n", "4", "--regions"])                 # --regions needs --compose
    with pytest.raises(SystemExit):
        main([str(runs / "runs" / "imm"), "--n", "4", "--best-of", "0"])
