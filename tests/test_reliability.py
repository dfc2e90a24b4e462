"""Reliability: run directories are never silently reused or shared, every job ends in bounded time, numeric faults
are caught, and each routine mistake is one clear message (the bad-input corpus at the end runs the real `nextx`
command in a subprocess and checks exit code 2, the message, and no traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextx.config import ConfigError, load_config
from nextx.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=1", "model.time_freq_dim=16",
        "data.batch_rows=2", "data.num_workers=0", "data.row_len=128", "data.max_text_tokens=32",
        "train.log_every=1", "train.threads=1", "train.save_every=1", "optim.warmup_steps=1", "data.shuffle_buffer=4",
        "data.pack_buffer=4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from data_tools.shapes import make_documents
    from nextx.documents import write_shards
    from nextx.latents import PixelTokenizer, pil_to_tensor
    from nextx.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("rel")
    docs = list(make_documents(40, 0, 16, "train"))
    write_shards(docs[:32], root / "shards", max_per_shard=16, progress=False)
    write_shards(docs[32:], root / "shards", split="heldout", progress=False)
    train_sentencepiece([d.texts[0] for d in docs], root / "text", vocab_size=128)
    PixelTokenizer.from_pixels(pil_to_tensor([d.images[0].pixels for d in docs], 16), 4).save(root / "pixel")
    data = [f"data.train_shards={root / 'shards'}", f"data.text_tokenizer={root / 'text'}",
            f"data.image_tokenizer={root / 'pixel'}", f"run_dir={root / 'runs'}"]
    return root, data


def _train(env, *over):
    from nextx.train import train

    root, data = env
    return train(load_config("configs/tiny.yaml", [*TINY, *data, *over]), quiet=True)


def test_same_name_other_config_refuses_then_new_run_or_overwrite(env):
    root, _ = env
    s = _train(env, "name=a", "train.steps=2")
    run = Path(s["out"])
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigError, match=r"already holds a run with a different config \(optim\).*if_exists=new_run"):
        _train(env, "name=a", "train.steps=2", "optim.lr=5e-4")
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before                                                     # nothing of the old run touched
    s2 = _train(env, "name=a", "train.steps=2", "optim.lr=5e-4", "train.if_exists=new_run")
    assert Path(s2["out"]).name == "a-2" and (Path(s2["out"]) / "checkpoints" / "latest").exists()
    assert load_config(Path(s2["out"]) / "config.yaml").name == "a-2"
    with pytest.raises(ConfigError, match="resume=never"):
        _train(env, "name=a", "train.steps=2", "train.resume=never")
    s3 = _train(env, "name=a", "train.steps=1", "optim.lr=5e-4", "train.if_exists=overwrite")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert s3["step"] == 1 and [r["step"] for r in rows if "loss" in r] == [1]   # the old run's rows are gone
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000001"]


def test_init_from_starts_from_another_runs_weights_and_refuses_what_does_not_fit(env):
    """train.init_from: the weights of another run (the next phase of a curriculum), nothing else; a model or a
    tokenizer that differs is refused by name."""
    from nextx.checkpoint import CheckpointError, read_state_dict, resolve

    root, _ = env
    a = Path(_train(env, "name=phase1", "train.steps=2")["out"])
    b = Path(_train(env, "name=phase2", "train.steps=1", "optim.lr=1e-12", "optim.weight_decay=0",
                    f"train.init_from={a}")["out"])
    cfg = load_config(b / "config.yaml")
    assert cfg.train.init_from == str(a.resolve())
    wa, wb = read_state_dict(resolve(a), cfg), read_state_dict(resolve(b), cfg)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-9) for k in wa)  # phase 1's weights
    assert json.loads((b / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1    # a fresh step count
    fresh = read_state_dict(resolve(_train(env, "name=fresh", "train.steps=1", "optim.lr=1e-12",
                                           "optim.weight_decay=0")["out"]), cfg)
    assert not all(torch.allclose(wa[k], fresh[k], atol=1e-6) for k in wa)               # init_from did something
    with pytest.raises(CheckpointError, match=r"model differs.*model.n_layers: 1 there, 2 here"):
        _train(env, "name=wide", "train.steps=1", "model.n_layers=2", f"train.init_from={a}")
    from nextx.tokenizer import train_sentencepiece
    from data_tools.shapes import make_documents

    train_sentencepiece([d.texts[0] for d in make_documents(40, 1, 16, "train")], root / "text2", vocab_size=120)
    with pytest.raises(CheckpointError, match="text tokenizer .* differs from data.text_tokenizer"):
        _train(env, "name=othertok", "train.steps=1", f"data.text_tokenizer={root / 'text2'}", f"train.init_from={a}")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        _train(env, "name=nothing", "train.steps=1", f"train.init_from={root / 'nope'}")


def test_a_second_writer_is_locked_out(env):
    from nextx.rundir import RunLock

    root, _ = env
    run = root / "runs" / "locked"
    run.mkdir(parents=True)
    held = RunLock(run)
    try:
        with pytest.raises(UserError, match=f"being written by another training \\(pid {os.getpid()}"):
            _train(env, "name=locked", "train.steps=1")
    finally:
        held.release()
    assert _train(env, "name=locked", "train.steps=1")["step"] == 1         # free again once released


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_run_dir_fails_before_any_step(env):
    root, _ = env
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            _train(env, f"run_dir={ro}", "name=x", "train.steps=1")
    finally:
        ro.chmod(0o700)


def test_unwritable_run_dir_is_refused_before_any_step(env, monkeypatch):
    """The probe write (nextx.rundir.check_writable) is what fails on a read-only filesystem; simulated for root."""
    import nextx.rundir as rd

    def deny(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(rd.Path, "write_text", deny)
    with pytest.raises(UserError, match="not writable .*Permission denied"):
        rd.check_writable(env[0] / "runs" / "probe")


def test_metrics_dedup_keeps_rows_up_to_the_resume_point(tmp_path):
    from nextx.rundir import dedup_metrics

    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert dedup_metrics(tmp_path, 2) == 3
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2]
    assert dedup_metrics(tmp_path, 2) == 0


@pytest.mark.parametrize("name", ["..", ".", "a/b", ""])
def test_run_names_stay_inside_run_dir(name):
    with pytest.raises(ConfigError, match="name"):
        load_config("configs/tiny.yaml", [f"name={name}"])


# --------------------------------------------------------------------------------------------------------
# Every job ends in bounded time


def test_impossible_packing_is_refused_before_any_work(env):
    from nextx.data import DataError, check_packing, longest_pair

    cfg = load_config("configs/tiny.yaml", ["data.row_len=32", "data.max_text_tokens=16"]).data
    assert longest_pair(cfg, 16) == 4 + 16 + 16                       # <bos> <boi> image <eoi> caption <eos>
    with pytest.raises(DataError, match=r"row_len=32 cannot hold .* up to 36 tokens.*row_len >= 36 or "
                                        r"data.max_text_tokens <= 12"):
        check_packing(cfg, 16)
    with pytest.raises(DataError, match="row_len=32 cannot hold"):
        _train(env, "name=pack", "train.steps=1", "data.row_len=32", "data.max_text_tokens=16")
    t2i = load_config("configs/tiny.yaml", ["data.t2i_ratio=1.0", "data.noise_copies=2", "objective.grouping=copies",
                                            "data.drop_trailing_clean=false"]).data
    assert longest_pair(t2i, 16) == 2 + t2i.max_text_tokens + 2 * 16 + 16 + 2


def _rewrite(src: Path, dst: Path, change) -> None:
    """Copy a shard dir member by member, `change(i, sample)` -> sample (or None to keep it)."""
    import shutil

    import webdataset as wds

    from nextx.documents import iter_raw_samples

    dst.mkdir()
    shutil.copy(src / "info.json", dst / "info.json")
    for tar in sorted(src.glob("train-*.tar")):
        with wds.TarWriter(str(dst / tar.name), mtime=0) as w:
            for i, s in enumerate(iter_raw_samples([str(tar)])):
                s = {k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
                w.write(change(i, s) or s)


def test_a_flood_of_bad_samples_stops_the_run_naming_the_shards(env):
    from nextx.data import DataError

    root, _ = env
    bad = root / "mostly_bad"
    _rewrite(root / "shards", bad, lambda i, s: {**s, "img0.png": b"not a png"} if i % 4 else None)
    with pytest.raises(DataError, match=r"bad samples of \d+ read .*max_bad_samples=5.*mostly_bad/train-00000"):
        _train(env, "name=flood", "train.steps=50", f"data.train_shards={bad}", "data.max_bad_samples=5")
    with pytest.raises(DataError, match="max_bad_fraction=0.2"):                 # 3/4 bad is over 1/5
        _train(env, "name=flood2", "train.steps=500", f"data.train_shards={bad}", "data.resample=false")


def test_all_corrupt_or_not_tar_shards_end_in_one_epoch(env, tmp_path):
    from nextx.data import DataError

    for i in range(2):
        (tmp_path / f"train-00000{i}.tar").write_bytes(os.urandom(3000))
    with pytest.raises(DataError, match=r"read a whole epoch of 2 shard\(s\).*packed no row: 2 samples, 2 bad"):
        _train(env, "name=junk", "train.steps=5", f"data.train_shards={tmp_path}")


def test_a_truncated_shard_is_detected_against_info_json(env):
    import shutil

    from nextx.data import DataError

    root, _ = env
    cut = root / "cut"
    shutil.copytree(root / "shards", cut)
    tar = cut / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])               # a copy interrupted mid-member
    with pytest.raises(DataError, match=r"train-000001.tar holds \d+ documents but its info.json records 16"):
        _train(env, "name=cut", "train.steps=50", f"data.train_shards={cut}")


def test_a_worker_error_is_reported_with_its_own_message(env):
    """With DataLoader workers, torch re-raises the worker's DataError wrapped in its traceback text; the CLI's
    message is the worker's message alone."""
    from nextx.data import DataError
    from nextx.errors import describe

    root, data = env
    (root / "junk.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DataError) as e:
        _train(env, "name=w", "train.steps=5", f"data.train_shards={root / 'junk.tar'}", "data.num_workers=1")
    assert "Original Traceback" in str(e.value)
    msg = describe(e.value)
    assert msg.startswith("reader 0 read a whole epoch") and "Traceback" not in msg


# --------------------------------------------------------------------------------------------------------
# Numeric faults


def _nan_at(monkeypatch, bad_calls):
    """compute_loss returns a NaN loss on the given call numbers (micro-batches, from 1)."""
    import nextx.train as T

    real, n = T.compute_loss, {"calls": 0}

    def fake(*a, **k):
        loss, parts = real(*a, **k)
        n["calls"] += 1
        return (loss * float("nan"), parts) if bad_calls(n["calls"]) else (loss, parts)

    monkeypatch.setattr(T, "compute_loss", fake)


def test_a_nan_loss_skips_its_micro_batch_and_is_counted(env, monkeypatch):
    import torch

    from nextx.checkpoint import load_for_inference

    _nan_at(monkeypatch, lambda c: c in (2, 4))
    s = _train(env, "name=nan2", "train.steps=4")
    assert s["step"] == 4
    rows = [json.loads(x) for x in (Path(s["out"]) / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("nonfinite_skipped", 0) for r in rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    model, *_ = load_for_inference(s["out"])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nonfinite_losses_in_a_row_stop_naming_step_and_checkpoint(env, monkeypatch):
    from nextx.train import NumericError

    _nan_at(monkeypatch, lambda c: c >= 3)
    with pytest.raises(NumericError, match=r"step 3: 3 non-finite losses in a row .*ce .*Last good checkpoint: "
                                           r".*nan3/checkpoints/step_0000002"):
        _train(env, "name=nan3", "train.steps=6", "train.max_nonfinite=3")


def test_checkpoints_with_nan_other_shapes_or_corrupt_files_are_refused(env, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from nextx.checkpoint import CheckpointError, load_for_inference

    s = _train(env, "name=ck", "train.steps=1")
    ex = Path(s["out"]) / "exports" / "step_0000001"
    bad = tmp_path / "nan"
    shutil.copytree(ex, bad)
    sd = load_file(str(bad / "model.safetensors"))
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = sd[k].clone().fill_(float("nan"))
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"1 weight tensor\\(s\\) hold NaN or inf \\({k}\\)"):
        load_for_inference(bad)
    other = tmp_path / "shape"
    shutil.copytree(ex, other)
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("d_model: 32", "d_model: 48"))
    with pytest.raises(CheckpointError, match=r"does not fit the model .* tensor\(s\) of another shape"):
        load_for_inference(other)
    cut = tmp_path / "cut"
    shutil.copytree(ex, cut)
    f = cut / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read .*corrupt or incomplete"):
        load_for_inference(cut)


# --------------------------------------------------------------------------------------------------------
# Runs are self-contained


def test_a_run_loads_from_any_directory_and_refuses_a_changed_tokenizer(env, tmp_path, monkeypatch):
    import shutil

    from nextx.checkpoint import CheckpointError, load_for_inference

    root, data = env
    tok = tmp_path / "tok"
    shutil.copytree(root / "text", tok / "text")
    monkeypatch.chdir(tmp_path)                                                # relative paths, as users write them
    rel = ["data.text_tokenizer=tok/text", f"data.image_tokenizer={root / 'pixel'}",
           f"data.train_shards={root / 'shards'}", "run_dir=runs", "name=rel", "train.steps=1"]
    from nextx.train import train

    s = train(load_config(str(ROOT / "configs/tiny.yaml"), [*TINY, *rel]), quiet=True)
    run = Path(s["out"]).resolve()
    cfg = load_config(run / "config.yaml")
    assert cfg.data.text_tokenizer == str(tok / "text") and Path(cfg.data.train_shards).is_absolute()
    man = json.loads((run / "tokenizers" / "manifest.json").read_text())
    assert set(man) == {"text", "image"} and (run / man["text"]["copy"]).is_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, cfg2, text_tok, *_ = load_for_inference(run)                        # from another directory
    assert cfg2.data.text_tokenizer.startswith(str(run)) and text_tok.encode("a red circle")
    (tok / "text" / "extra.txt").write_text("retrained")                        # the source tokenizer changes
    assert load_for_inference(run)[0] is not None                               # inference uses the run's copy
    with pytest.raises(CheckpointError, match="changed since this run began"):  # a resume would mix vocabularies
        train(load_config(run / "config.yaml", ["train.steps=2"]), quiet=True)
    copy = run / man["text"]["copy"]
    next(p for p in copy.iterdir() if p.is_file()).write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="run's copy of its text tokenizer is missing or was changed"):
        load_for_inference(run)


# --------------------------------------------------------------------------------------------------------
# The bad-input corpus (tests/fixtures/bad_inputs.yaml)

CASES = __import__("yaml").safe_load((ROOT / "tests" / "fixtures" / "bad_inputs.yaml").read_text())


@pytest.fixture(scope="module")
def good_run(env):
    s = _train(env, f"run_dir={env[0] / 'corpus_runs'}", "name=good", "train.steps=1")
    return Path(s["out"])


def _export_copy(run: Path, tmp: Path) -> Path:
    import shutil

    shutil.copytree(run, tmp / "run")
    return tmp / "run" / "exports" / "step_0000001"


def _setup_bad_yaml(tmp, run):
    (tmp / "bad.yaml").write_text("model: {d_model: 64\n  n: [1\n")


def _setup_latin1_yaml(tmp, run):
    (tmp / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))


def _setup_junk_shards(tmp, run):
    (tmp / "junk").mkdir()
    for i in range(2):
        (tmp / "junk" / f"train-00000{i}.tar").write_bytes(b"\x00junk" * 700)


def _setup_empty_prompts(tmp, run):
    (tmp / "p.txt").write_text("\n  \n")


def _setup_latin1_prompts(tmp, run):
    (tmp / "p.txt").write_bytes("a caf\xe9 circle\n".encode("latin-1"))


def _setup_corrupt_export(tmp, run):
    f = _export_copy(run, tmp) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:64])


def _setup_reshaped_export(tmp, run):
    c = _export_copy(run, tmp) / "config.yaml"
    c.write_text(c.read_text().replace("n_layers: 1", "n_layers: 2"))


def _setup_nan_export(tmp, run):
    from safetensors.torch import load_file, save_file

    f = _export_copy(run, tmp) / "model.safetensors"
    sd = load_file(str(f))
    sd = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(f))


def _setup_out_file(tmp, run):
    (tmp / "o").write_text("a file where the output dir should go")


def _setup_images_one_bad(tmp, run):
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp / "good.png")
    (tmp / "bad.png").write_bytes(b"not a png")


def _expand(argv, env, run, tmp):
    root, data = env
    subst = {"{root}": str(root), "{run}": str(run), "{tmp}": str(tmp), "{shards}": str(root / "shards"),
             "{text}": str(root / "text"), "{pixel}": str(root / "pixel")}
    out = []
    for a in argv:
        if a == "{cfg}":
            out += [str(ROOT / "configs" / "tiny.yaml"), *TINY, *data]
            continue
        for k, v in subst.items():
            a = a.replace(k, v)
        out.append(a)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_corpus(case, env, good_run, tmp_path, capsys):
    """One routine mistake: the real entry point (`nextx.cli.main`, what the `nextx` script runs) ends with the
    case's exit code and message, without a traceback."""
    import time

    from nextx.cli import main

    if case.get("setup"):
        globals()[f"_setup_{case['setup']}"](tmp_path, good_run)
    t0 = time.perf_counter()
    try:
        rc = main(_expand(case["argv"], env, good_run, tmp_path))
    except SystemExit as e:                     # argparse's usage errors exit 2 after printing their message
        rc = e.code
    seconds = time.perf_counter() - t0
    out = capsys.readouterr()
    assert rc == case.get("rc", 2), f"rc {rc}\n{out.err[-3000:]}"
    assert "Traceback" not in out.err + out.out, out.err[-3000:]
    import re

    assert re.search(case["message"], out.err), f"expected /{case['message']}/ in:\n{out.err[-2000:]}"
    assert seconds < 60, f"{case['name']} took {seconds:.0f} s"
    lines = [x for x in out.err.strip().splitlines() if x.strip() and "it/s]" not in x]   # progress bars aside
    assert len(lines) <= 3 or case.get("rc", 2) != 2 or "usage:" in out.err, out.err


def test_corpus_size():
    assert len(CASES) >= 40 and len({c["name"] for c in CASES}) == len(CASES)


def test_unknown_words_in_a_prompt_are_named(env, good_run, tmp_path, capsys):
    from nextx.cli import main

    assert main(["t2i", str(good_run), "--prompt", "a RED Circle", "--prompt", "a red circle", "--out",
                 str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "prompt 'a RED Circle': 'RED', 'Circle' not in the tokenizer's vocabulary" in err
    assert "'a red circle'" not in err


def test_caption_keeps_the_good_files_when_one_is_bad(env, good_run, tmp_path, capsys):
    from nextx.cli import main

    _setup_images_one_bad(tmp_path, good_run)
    assert main(["caption", str(good_run), str(tmp_path / "good.png"), str(tmp_path / "bad.png"), "--out",
                 str(tmp_path / "c.json")]) == 1
    rows = json.loads((tmp_path / "c.json").read_text())["captions"]
    assert [r["image"].endswith("good.png") and "error" not in r for r in rows] == [True, False]
    assert "error" in rows[1] and rows[1]["caption"] == ""


def test_a_nonfinite_gradient_drops_the_update(env, monkeypatch):
    """A finite loss whose gradient is inf (plain engine): the update is dropped and counted, the step redone; the
    weights stay finite. K such steps in a row stop the run."""
    import torch

    import nextx.train as T
    from nextx.checkpoint import load_for_inference
    from nextx.train import NumericError

    class InfGrad(torch.autograd.Function):                                     # adds 0, sends back inf
        @staticmethod
        def forward(ctx, x):
            ctx.shape = x.shape
            return x.sum() * 0

        @staticmethod
        def backward(ctx, g):
            return torch.full(ctx.shape, float("inf"))

    real, n = T.compute_loss, {"calls": 0}

    def fake(model, *a, bad=lambda c: c == 2, **k):
        loss, parts = real(model, *a, **k)
        n["calls"] += 1
        if bad(n["calls"]):
            loss = loss + InfGrad.apply(next(model.parameters()))
        return loss, parts

    monkeypatch.setattr(T, "compute_loss", fake)
    s = _train(env, "name=infgrad", "train.steps=3")
    rows = [json.loads(x) for x in (Path(s["out"]) / "metrics.jsonl").read_text().splitlines()]
    assert s["step"] == 3 and sum(r.get("nonfinite_skipped", 0) for r in rows) == 1
    model, *_ = load_for_inference(s["out"])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    n["calls"] = 0
    monkeypatch.setattr(T, "compute_loss", lambda m, *a, **k: fake(m, *a, bad=lambda c: c >= 2, **k))
    with pytest.raises(NumericError, match="3 non-finite gradients in a row"):
        _train(env, "name=infgrad2", "train.steps=5", "train.max_nonfinite=3")
