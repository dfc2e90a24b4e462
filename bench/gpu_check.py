"""Every check that needs CUDA, in one run (`bash bench/gpu_check.sh [--tiny] [OUT_DIR]`, README "The GPU check").

Sections run one after the other, each in its own subprocess with its own time limit; a failing section is recorded
with the tail of its output and the next one runs. Results: OUT/gpu_check.json (every section: status ok | fail |
skipped, seconds, figures, log tail) and OUT/gpu_check.md (a table). Nothing is installed: a missing package is
named in the `env` section and in the sections that need it.

    env          torch / CUDA / device, and which of deepspeed, webdataset, open_clip, xformers, transformers import
    pytest_gpu   pytest -m gpu: flex == dense forward and backward, the model's flex backend == SDPA with grads
    train_zero2  a real `nextx train`: DeepSpeed ZeRO-2, bf16, flex attention, compiled blocks, 30 steps of
                 configs/small.yaml-shaped rows (2048 tokens, 64 px shapes as 8x8 pixel patches) on generated data;
                 killed at step 20 (SIGKILL) and resumed; the loss must fall; torch.compile recompilations counted
    train_zero3  ZeRO-3 for 6 steps, the export, and `nextx t2i` from the export
    host_syncs   one training step (forward, IMM target pass, backward, optimizer) under
                 torch.cuda.set_sync_debug_mode("warn"): the host syncs it makes, by source line
    throughput   bench/train_throughput.py: tokens/s and MFU of the ~400M config vs transformers' Llama of the same
                 dims; flex block mask vs SDPA causal vs SDPA dense at 4k
    t2i_latency  bench/t2i_latency.py: IMM 1/2/4/8 vs flow 50 steps per image, batch 1 and 8, cached vs recompute
    caption      bench/caption_decode.py against transformers' generate
    xformers     the xformers backend == SDPA, or the exact reason it cannot run

--tiny runs every section at toy size on the CPU (DeepSpeed over gloo, fp32, SDPA, no compile): the test suite's smoke
test of this script (tests/test_gpu_check.py), so a GPU day never starts with a typo.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470          # all sections together (the GPU session's 8 minutes, minus start-up)
DEADLINE: float | None = None   # perf_counter time at which every section's command is cut off (set by main; None: none)
PACKAGES = ("deepspeed", "webdataset", "open_clip", "xformers", "transformers", "sentencepiece")


def run(cmd: list[str], out: Path, name: str, timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    """Run a command, its output into OUT/logs/NAME.log; -> (rc, log text, seconds). rc 124 on timeout."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if DEADLINE is not None:   # no command outlives the whole check's budget: a late section is cut, not the check
        timeout = max(5.0, min(timeout, DEADLINE - t0))
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=e, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
            fh.write(f"\n[gpu_check] timed out after {timeout:.0f} s\n")
    return rc, log.read_text(), time.perf_counter() - t0


def nextx(*args: str) -> list[str]:
    return [sys.executable, "-m", "nextx.cli", *args]


def missing(pkgs) -> list[str]:
    import importlib.util

    return [p for p in pkgs if importlib.util.find_spec(p) is None]


class Check:
    def __init__(self, out: Path, tiny: bool):
        self.out, self.tiny = out, tiny
        self.cuda = _cuda()
        self.sections: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    def section(self, name: str, fn) -> None:
        left = BUDGET_S - (time.perf_counter() - self.t0)
        if left < 20 and not self.tiny:
            self.sections[name] = {"status": "skipped", "reason": "out of time (the 8-minute budget)"}
            return
        t = time.perf_counter()
        try:
            res = fn() or {}
        except Exception as e:  # noqa: BLE001 - a section's failure is a result, the next one runs
            res = {"status": "fail", "error": f"{type(e).__name__}: {e}"}
        res.setdefault("status", "ok")
        res["seconds"] = round(time.perf_counter() - t, 1)
        self.sections[name] = res
        self.write()
        print(f"[gpu_check] {name}: {res['status']} ({res['seconds']} s)"
              + (f" - {res.get('error') or res.get('reason')}" if res["status"] != "ok" else ""), flush=True)

    def write(self) -> dict:
        """OUT/gpu_check.json and .md with the sections so far (rewritten after each: a killed check keeps its table)."""
        import torch

        res = {"device": self.cuda or "cpu", "tiny": self.tiny, "date": time.strftime("%Y-%m-%d %H:%M"),
               "torch": torch.__version__, "seconds": time.perf_counter() - self.t0, "sections": self.sections}
        (self.out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(res))
        return res

    # ---- sections

    def env(self) -> dict:
        import torch

        r = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": self.cuda or "cpu",
             "missing_packages": missing(PACKAGES), "python": sys.version.split()[0]}
        return r

    def pytest_gpu(self) -> dict:
        # no log capture (torch's DEBUG trace would bury the failure), short tracebacks: the error fits the log tail
        rc, log, _ = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                          "--tb=short", "-rf", "tests"], self.out, "pytest_gpu", 150)
        m = re.search(r"(\d+) passed", log)
        s = re.search(r"(\d+) skipped", log)
        f = re.search(r"(\d+) failed", log)
        res = {"passed": int(m.group(1)) if m else 0, "skipped": int(s.group(1)) if s else 0,
               "failed": int(f.group(1)) if f else 0, "log_tail": log[-1500:],
               "errors": [x for x in log.splitlines() if x.startswith(("E ", "FAILED"))][:12]}
        if rc not in (0, 5) or res["failed"]:
            res.update(status="fail", error="; ".join(res["errors"])[:600] or f"pytest rc {rc}")
        elif not self.cuda:
            res.update(status="skipped", reason="no CUDA device: the gpu tests skip themselves")
        return res

    def _data(self) -> dict:
        """Shapes shards and tokenizers for the training sections (64 px as 8x8 patches of 8 px; 16 px x 4 tiny)."""
        d = self.out / "data"
        size, patch, n = (16, 4, 96) if self.tiny else (64, 8, 2000)
        if not (d / "tok_pixel").exists():
            for cmd, name in ((nextx("data", "shapes", "--out", str(d / "shapes"), "--n", str(n), "--size", str(size),
                                     "--heldout-n", "16", "--force"), "data_shapes"),
                              (nextx("tokenizer", "text", "--shards", str(d / "shapes"), "--out", str(d / "tok_text"),
                                     "--vocab-size", "128", "--force"), "data_text"),
                              (nextx("tokenizer", "pixel", "--shards", str(d / "shapes"), "--out", str(d / "tok_pixel"),
                                     "--image-size", str(size), "--patch-size", str(patch), "--force"), "data_pixel")):
                rc, log, _ = run(cmd, self.out, name, 300)
                if rc:
                    raise RuntimeError(f"{name} failed: {log[-800:]}")
        return {"shards": str(d / "shapes"), "text": str(d / "tok_text"), "pixel": str(d / "tok_pixel")}

    def _train_args(self, name: str, zero: int, steps: int) -> list[str]:
        d = self._data()
        common = [f"data.train_shards={d['shards']}", f"data.val_shards={d['shards']}", f"data.text_tokenizer={d['text']}",
                  f"data.image_tokenizer={d['pixel']}", "data.use_latents=auto", f"run_dir={self.out / 'runs'}",
                  f"name={name}", f"train.steps={steps}", "train.sample_every=0", "train.eval_every=0",
                  "train.if_exists=overwrite", f"dist.zero_stage={zero}", "dist.engine=deepspeed",
                  "data.val_split=heldout"]
        if self.tiny:
            return ["configs/tiny.yaml", *common, "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                    "model.n_kv_heads=1", "model.time_freq_dim=16", "data.row_len=128", "data.batch_rows=2",
                    "data.max_text_tokens=48",
                    "data.num_workers=0", "dist.precision=fp32", "model.attention=sdpa", "train.log_every=1",
                    "optim.lr=3e-3", "optim.warmup_steps=1",
                    "train.save_every=2", "train.threads=1"]
        return ["configs/small.yaml", *common, "data.row_len=2048", "data.batch_rows=16", "data.num_workers=4",
                "dist.precision=bf16", "model.attention=flex", f"dist.compile={'true' if zero < 3 else 'false'}",
                "train.log_every=1", "train.save_every=10", "optim.warmup_steps=5"]

    def train_zero2(self) -> dict:
        if missing(["deepspeed", "webdataset"]):
            return {"status": "fail", "error": f"missing package(s): {', '.join(missing(['deepspeed', 'webdataset']))}"}
        steps, kill = (6, 3) if self.tiny else (30, 20)
        args = self._train_args("zero2", 2, steps)
        env = {"TORCH_LOGS": "recompiles"}
        rc1, log1, s1 = run(nextx("train", *args), self.out, "train_zero2", 300, {**env, "NEXTX_FAULT": f"step:{kill}"})
        rc2, log2, s2 = run(nextx("train", *args), self.out, "train_zero2", 300, env)   # log2: both runs' log
        rows = [json.loads(x) for x in (self.out / "runs" / "zero2" / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["ce"] for r in rows if "ce" in r}   # the text CE: the least noisy part of the loss
        steps_logged = [r["step"] for r in rows if "loss" in r]
        k = max(1, len(losses) // 5)
        first, last = (sum(list(losses.values())[:k]) / k, sum(list(losses.values())[-k:]) / k) if losses else (0, 0)
        res = {"killed_rc": rc1, "resume_rc": rc2, "steps": max(losses or [0]), "ce_first": first, "ce_last": last,
               "duplicate_rows": len(steps_logged) - len(set(steps_logged)),
               "recompilations": len(re.findall(r"Recompiling function", log2)),
               "tokens_per_s": rows[-1].get("tokens_per_s") if rows else None,
               "mfu": next((r["mfu"] for r in reversed(rows) if "mfu" in r), None),
               "seconds_first": round(s1, 1), "seconds_resume": round(s2, 1), "log_tail": log2[-1200:]}
        ok = rc1 != 0 and rc2 == 0 and res["steps"] == steps and not res["duplicate_rows"] and last < first
        if not ok:
            res["status"] = "fail"
            res["error"] = ("expected: killed run rc != 0, resume rc 0 to the last step, no duplicate rows, text CE falls; "
                            f"got rc {rc1}/{rc2}, steps {res['steps']}, duplicates {res['duplicate_rows']}, CE "
                            f"{first:.3f} -> {last:.3f}")
        return res

    def train_zero3(self) -> dict:
        if missing(["deepspeed", "webdataset"]):
            return {"status": "fail", "error": f"missing package(s): {', '.join(missing(['deepspeed', 'webdataset']))}"}
        rc, log, _ = run(nextx("train", *self._train_args("zero3", 3, 3 if self.tiny else 6)), self.out, "train_zero3",
                         300)
        if rc:
            return {"status": "fail", "error": f"train rc {rc}", "log_tail": log[-1500:]}
        run_dir = self.out / "runs" / "zero3"
        exports = sorted((run_dir / "exports").glob("step_*"))
        rc2, log2, s = run(nextx("t2i", str(run_dir), "--prompt", "a red circle", "--prompt", "a blue square", "--steps",
                                 "4", "--out", str(self.out / "t2i_zero3"), "--device", "cuda" if self.cuda else "cpu"),
                           self.out, "train_zero3_t2i", 120)
        pngs = sorted(p.name for p in (self.out / "t2i_zero3").glob("*.png")) if rc2 == 0 else []
        res = {"export": str(exports[-1]) if exports else None, "t2i_rc": rc2, "t2i_files": pngs,
               "t2i_seconds": round(s, 1), "log_tail": log2[-800:]}
        if rc2 or not exports or "grid.png" not in pngs:
            res.update(status="fail", error="no export, or t2i from it failed")
        return res

    def host_syncs(self) -> dict:
        dev = "cuda" if self.cuda else "cpu"   # on the CPU the step runs (the smoke test), its syncs are not counted
        code = SYNC_SNIPPET.format(args=json.dumps(self._train_args("syncs", 0, 2)), device=json.dumps(dev))
        rc, log, _ = run([sys.executable, "-c", code], self.out, "host_syncs", 180)
        m = re.search(r"SYNC_RESULT (.*)", log)
        if rc or not m:
            return {"status": "fail", "error": f"rc {rc}", "log_tail": log[-1500:]}
        if not self.cuda:
            return {"status": "skipped", "reason": "no CUDA device: the step ran on the CPU, host syncs not counted "
                                                   "(torch.cuda.set_sync_debug_mode needs one)"}
        return json.loads(m.group(1))

    def throughput(self) -> dict:
        f = self.out / "throughput.json"
        cmd = [sys.executable, "bench/train_throughput.py", "--json", str(f)]
        cmd += ["--tiny"] if self.tiny else ["--setups", "400m", "--steps", "8", "--warmup", "3", "--compile"]
        rc, log, _ = run(cmd, self.out, "throughput", 240)
        # the bench prints one JSON line per record as it goes: a run cut by the deadline keeps what it measured
        printed = [json.loads(x) for x in log.splitlines() if x.startswith('{"section"')]
        res = {"records": json.loads(f.read_text()) if f.is_file() else printed, "log_tail": log[-1200:]}
        if rc:
            res.update(status="fail", error=f"rc {rc}")
        return res

    def _bench(self, script: str, name: str, tiny_args: list[str]) -> dict:
        """A decode/latency bench on this device (tiny: a toy model on one CPU thread); its table is the result."""
        dev = ["--device", "cuda"] if self.cuda else ["--device", "cpu", "--threads", "1"]
        toy = ["--d-model", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--grid", "2",
               "--latent-dim", "4", "--repeats", "1", "--batches", "1"]
        rc, log, _ = run([sys.executable, script, *dev, *(toy + tiny_args if self.tiny else [])], self.out, name, 120)
        return {"status": "ok" if rc == 0 else "fail", "table": log[-2500:]}

    def t2i_latency(self) -> dict:
        return self._bench("bench/t2i_latency.py", "t2i_latency", ["--lengths", "16"])

    def caption(self) -> dict:
        return self._bench("bench/caption_decode.py", "caption", ["--new-tokens", "4"])

    def xformers(self) -> dict:
        from nextx.masks import xformers_available

        av = xformers_available()
        if not av:
            return {"status": "skipped", "reason": f"xformers cannot run here: {av.reason}"}
        if not self.cuda:
            return {"status": "skipped", "reason": "xformers imports, but its kernels need CUDA"}
        rc, log, _ = run([sys.executable, "-c", XFORMERS_SNIPPET], self.out, "xformers", 120)
        m = re.search(r"XF_RESULT (.*)", log)
        if rc or not m:
            return {"status": "fail", "error": f"rc {rc}", "log_tail": log[-1500:]}
        return json.loads(m.group(1))


def _cuda() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


SYNC_SNIPPET = r'''
import json, warnings, collections, traceback, torch
from nextx.config import load_config
from nextx.data import build_loader
from nextx.engine import build_engine
from nextx.latents import load_image_tokenizer
from nextx.objective import compute_loss
from nextx.pretrained import build_model
from nextx.sequence import SpecialIds
from nextx.tokenizer import load_tokenizer
args = {args}
dev = {device}
cfg = load_config(args[0], [a for a in args[1:] if not a.startswith(("dist.engine", "dist.zero_stage", "dist.compile"))]
                  + ["dist.engine=plain", "dist.zero_stage=0", "dist.compile=false"])
tt, it = load_tokenizer(cfg.data.text_tokenizer), load_image_tokenizer(cfg.data.image_tokenizer)
sp = SpecialIds.from_tokenizer(tt)
model = build_model(cfg, tt, it).to(dev)
eng = build_engine(cfg, model)
batch = next(iter(build_loader(cfg.data, num_workers=0))).to(dev)
def step():
    with eng.autocast():
        loss, parts = compute_loss(eng.model, batch, cfg.objective, sp, attention=cfg.model.attention,
                                   n_heads=cfg.model.n_heads, generator=torch.Generator().manual_seed(0), step=0)
    eng.backward(loss); eng.step()
step()
cuda = dev == "cuda"
if cuda:
    torch.cuda.synchronize()
where = collections.Counter()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    step()
    if cuda:
        torch.cuda.set_sync_debug_mode(0)
for x in w:
    if "synchroniz" in str(x.message):
        where[f"{{x.filename.split('site-packages/')[-1]}}:{{x.lineno}}"] += 1
print("SYNC_RESULT " + json.dumps({{"syncs_per_step": sum(where.values()), "where": where.most_common(12)}}))
'''

XFORMERS_SNIPPET = r'''
import json, torch
from nextx.config import ModelConfig
from nextx.model import NextX, ModelInput
from nextx.masks import dense_mask
torch.manual_seed(0)
outs = []
for backend in ("sdpa", "xformers"):
    torch.manual_seed(0)
    m = NextX(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, time_freq_dim=16, attention=backend),
              vocab_size=100, latent_dim=8).cuda()
    B, L = 2, 40
    ids = torch.randint(6, 100, (B, L), device="cuda")
    kind = torch.ones(B, L, dtype=torch.int8, device="cuda")
    doc = torch.zeros(B, L, dtype=torch.int32, device="cuda"); split = torch.full((B, L), -1, dtype=torch.int32, device="cuda")
    inp = ModelInput(ids, kind, torch.arange(L, device="cuda").expand(B, L), torch.zeros(B, L, 2, dtype=torch.long, device="cuda"),
                     torch.zeros(B, L, 8, device="cuda"), torch.full((B, L), -1, device="cuda"), torch.zeros(0, device="cuda"),
                     torch.zeros(0, device="cuda"), dense_mask(doc, kind, split))
    outs.append(m(inp).text_logits.float())
print("XF_RESULT " + json.dumps({"max_abs_diff_vs_sdpa": float((outs[0] - outs[1]).abs().max())}))
'''


def markdown(res: dict) -> str:
    lines = ["# nextx GPU check", "", f"{res['device']}, {res['date']}, {'--tiny (CPU smoke)' if res['tiny'] else 'full'};"
             f" {res['seconds']:.0f} s in all.", "", "| section | status | seconds | figures / reason |", "|---|---|---|---|"]
    for name, s in res["sections"].items():
        figs = {k: v for k, v in s.items() if k not in ("status", "seconds", "log_tail", "table", "records", "error",
                                                        "reason")}
        note = s.get("error") or s.get("reason") or ", ".join(f"{k} {v}" for k, v in figs.items())
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {str(note)[:300]} |")
    for name in ("t2i_latency", "caption"):
        if res["sections"].get(name, {}).get("table"):
            lines += ["", f"## {name}", "", "```", res["sections"][name]["table"].strip()[-2000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="gpu_check_out", help="output dir (default gpu_check_out/)")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (the test suite's smoke test)")
    p.add_argument("--only", default="", help="comma list of sections to run (default: all)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    c = Check(out, a.tiny)
    if not a.tiny and not c.cuda:
        print("[gpu_check] no CUDA device: run with --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    global DEADLINE
    if not a.tiny:
        DEADLINE = c.t0 + BUDGET_S
    # the README table's figures (MFU, attention backends, latency, decode) right after the first training
    names = ("env", "pytest_gpu", "train_zero2", "throughput", "t2i_latency", "caption", "host_syncs", "train_zero3",
             "xformers")
    only = set(a.only.split(",")) if a.only else set(names)
    for name in names:
        if name in only:
            c.section(name, getattr(c, name))
    c.write()
    print((out / "gpu_check.md").read_text())
    failed = [n for n, s in c.sections.items() if s["status"] == "fail"]
    print(f"-> {out / 'gpu_check.json'}, {out / 'gpu_check.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
