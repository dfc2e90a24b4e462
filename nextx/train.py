"""The training loop, top to bottom: `nextx train CONFIG [key=value ...]` or `python -m nextx.train CONFIG ...`.

Launch (rank and world size come from the environment; see README "Training on several processes and machines"):
    nextx train configs/tiny.yaml                                   one process (plain or DeepSpeed)
    torchrun --nproc_per_node 8 -m nextx.train configs/small.yaml   one machine, 8 processes
    deepspeed --num_gpus 8 --module nextx.train configs/base.yaml   the DeepSpeed launcher (--hostfile for many)
    sbatch scripts/slurm_example.sbatch configs/base.yaml           SLURM, srun + torchrun per node

Steps: config -> distributed init -> run dir (config.yaml, metrics.jsonl, tb/) -> tokenizers -> model -> engine
-> resume (engine state, data position, RNG) -> packed batches -> loop {objective, backward, step, log, samples,
eval, checkpoint} -> final checkpoint + export.

Per micro-batch k of the global batch at step n (k = accumulation index x world + rank) the objective's generator
is seeded from (train.seed, n, k): the random draws then do not depend on how the global batch is split into ranks
and accumulation steps (1 process x 2 accumulation steps == 2 processes x 1) nor on where a run was resumed.

Host syncs: the loop itself reads device values only at log steps (losses are summed on the host from the parts
the objective returns; token counts come from the CPU batch before the copy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nextx.checkpoint import (absolute_paths, barrier, clean_partial, export, fault_point, init_weights_from,
                              latest_checkpoint, load_run_config, load_train_state, save_checkpoint, set_rng_state,
                              snapshot_tokenizers)
from nextx.config import Config, ConfigError, load_config, save_config, to_dict
from nextx.data import build_loader
from nextx.engine import build_engine, compile_blocks, init_distributed
from nextx.metrics import (COUNT_KEYS, LOSS_KEYS, Metrics, all_reduce_sum, count_batch, fmt_record, log_record,
                           new_accumulator, peak_flops, token_flops)
from nextx.errors import UserError
from nextx.objective import compute_loss
from nextx.pretrained import build_model
from nextx.sequence import SpecialIds



def print0(*a, **k):
    if _rank() == 0:
        print(*a, **k, flush=True)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def micro_seed(seed: int, step: int, k: int) -> int:
    """Seed of the objective's generator for micro-batch k of the global batch at optimizer step `step`."""
    return ((seed * 1_000_003 + step) * 65_537 + k) % (2**63 - 1)


def _resume_keys(cfg: Config) -> dict:
    d = to_dict(absolute_paths(cfg))
    d["data"].pop("num_workers")
    return {k: d[k] for k in ("model", "data", "objective", "optim", "dist")} | {"seed": d["train"]["seed"]}


def run_conflict(cfg: Config, out: Path) -> list[str]:
    """The config sections (model, data, objective, optim, dist, seed) in which the run saved in `out` differs from
    `cfg`: [] when they agree or `out` holds no run."""
    if not (out / "config.yaml").is_file():
        return []
    a, b = _resume_keys(load_run_config(out / "config.yaml")), _resume_keys(cfg)
    return [k for k in a if a[k] != b[k]]


def find_resume(cfg: Config, out: Path) -> tuple[Path, Path | None]:
    """-> (the run dir to write, the checkpoint to continue from or None), per train.resume and train.if_exists
    (see TrainConfig and nextx.rundir). Decided identically on every rank before any rank writes."""
    from nextx.rundir import conflict_message, next_free

    if not (out / "config.yaml").is_file():
        if cfg.train.resume == "must":
            raise ConfigError(f"train.resume: 'must' but {out} holds no run")
        return out, None
    diff = run_conflict(cfg, out)
    if not diff and cfg.train.resume != "never":
        d = latest_checkpoint(out)
        if d is None and cfg.train.resume == "must":
            raise ConfigError(f"train.resume: 'must' but {out}/checkpoints has no complete checkpoint")
        return out, d
    if cfg.train.resume == "must":
        raise ConfigError(f"train.resume: {out} was written with a different config ({', '.join(diff)})")
    if cfg.train.if_exists == "new_run":
        new = next_free(out)
        print0(f"{out} holds another run ({', '.join(diff) or 'train.resume=never'}): writing {new} "
               "(train.if_exists=new_run)")
        return new, None
    if cfg.train.if_exists == "overwrite":
        print0(f"{out}: deleting the earlier run's checkpoints, exports and metrics (train.if_exists=overwrite)")
        return out, None
    raise ConfigError("train.if_exists: " + conflict_message(out, diff or ["train.resume=never asks for a new run"]))


def _wipe_outputs(out: Path) -> None:
    """The outputs of an earlier run in `out` (train.if_exists=overwrite), so nothing of it mixes with this one."""
    import shutil

    for name in ("checkpoints", "exports", "samples", "reports", "tb"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    for name in ("metrics.jsonl", "config.yaml"):
        (out / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# Periodic extras: sample grids and quick eval


def fixed_examples(cfg: Config, text_tok, image_tok, n: int) -> tuple[list[str], torch.Tensor]:
    """The first n caption+image documents of the val shards (or train shards): captions and image latents."""
    from nextx.data import _image_tokens
    from nextx.documents import BadSample, decode_document, iter_raw_samples, shard_paths

    src = cfg.data.val_shards or cfg.data.train_shards
    split = cfg.data.val_split if cfg.data.val_shards else cfg.data.train_split
    caps, lats = [], []
    for raw in iter_raw_samples(shard_paths(src, split)):
        try:
            doc = decode_document(raw)
            if not doc.is_pair():
                continue
            lats.append(torch.from_numpy(_image_tokens(doc.images, image_tok, cfg.data.use_latents, doc.key)[0]))
        except (BadSample, ValueError):
            continue
        caps.append(doc.texts[0])
        if len(caps) == n:
            break
    return caps, torch.stack(lats) if lats else torch.zeros(0)


@torch.no_grad()
def sample_grid(model, cfg: Config, examples, text_tok, image_tok, special, out: Path, step: int, device) -> None:
    """samples/step_N.png (rows: truth, 1, 2, 4, 8 IMM steps; columns: fixed prompts) + step_N.json (captions of
    the fixed images). Every rank runs it under ZeRO-3 (gathers are collective); rank 0 writes."""
    from PIL import Image as PILImage

    from nextx.infer import Pipeline

    caps, lats = examples
    if not caps:
        return
    was = model.training
    pipe = Pipeline.from_model(model, cfg, text_tok, image_tok, special, device)   # eval mode; restored below
    rows = [image_tok.decode(lats)]
    for k in (1, 2, 4, 8):  # the KV-cached samplers (nextx.generate) run flex-trained models on SDPA themselves
        rows.append(pipe.t2i(caps, steps=k, cfg_scale=1.0, seed=0, batch_size=len(caps)))
    gen_caps = pipe.caption(rows[0], max_new_tokens=cfg.data.max_text_tokens, batch_size=len(caps))
    model.train(was)
    if _rank() != 0:
        return
    grid = torch.cat(rows)                                                          # (5 n, 3, H, W)
    n, (h, w) = len(caps), grid.shape[-2:]
    arr = (grid.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    canvas = np.full((len(rows) * h, n * w, 3), 255, np.uint8)
    for i, a in enumerate(arr):
        r, c = divmod(i, n)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = a
    d = out / "samples"
    d.mkdir(exist_ok=True)
    scale = max(1, 128 // h)
    PILImage.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), PILImage.NEAREST).save(
        d / f"step_{step:07d}.png")
    (d / f"step_{step:07d}.json").write_text(json.dumps(
        {"step": step, "rows": ["truth", "1 step", "2 steps", "4 steps", "8 steps"], "prompts": caps,
         "captions": [{"truth": t, "generated": g} for t, g in zip(caps, gen_caps)]}, indent=2))


def report_docs(cfg: Config) -> list:
    """The held-out documents of the periodic report (`train.report_every`): the first train.report_prompts of the
    val split; they must be shapes scenes (the exact scorer reads their objects). Checked before the first step."""
    if not cfg.train.report_every:
        return []
    from evals.shapes_eval import held_out_docs

    docs = held_out_docs(cfg, cfg.train.report_prompts)
    if not all(d.is_pair() and "objects" in d.meta for d in docs):
        raise ConfigError(f"train.report_every: the val split of {cfg.data.val_shards} is not shapes scenes (the "
                          "exact scorer needs their objects); use `nextx eval report --clip` on other data, or set "
                          "train.report_every=0")
    return docs


def periodic_report(model, cfg: Config, docs, text_tok, image_tok, special, out: Path, step: int) -> dict:
    """`evals.report.evaluate` on the fixed report prompts (IMM 1/2/4/8 or flow 8/25/50 steps) -> the report in
    RUN/reports/step_N/ (rank 0 writes) and its headline figures as one metrics record. Every rank runs it under
    ZeRO-3 (gathers are collective)."""
    from evals.report import FLOW_STEPS, IMM_STEPS, evaluate, write_report

    was = model.training
    steps = FLOW_STEPS if cfg.objective.kind == "flow" else IMM_STEPS
    d = out / "reports" / f"step_{step:07d}"
    rank0 = _rank() == 0
    sec = evaluate(model, cfg, text_tok, image_tok, special, docs, steps, cfg_scale=1.0, batch=len(docs), seed=0,
                   out=d if rank0 else None)
    model.train(was)
    rec = {"step": step}
    for k, r in sec["t2i"].items():
        rec[f"report_all_facts@{k}"] = r["all_correct"]
        for f in ("colour", "position", "count", "shape"):
            if f in r["accuracy"]:
                rec[f"report_{f}@{k}"] = r["accuracy"][f]
    rec["report_caption_precision"] = sec["caption"]["precision"]
    for lay, v in sec["perplexity"].items():
        rec[f"report_ppl_{lay}"] = v["perplexity"]
    if rank0:
        write_report({"out": str(d), "models": {cfg.objective.kind: sec}, "runs": {cfg.objective.kind: str(out)},
                      "settings": {"n": len(docs), "prompts": f"{cfg.data.val_shards}:{cfg.data.val_split}",
                                   "seed": 0, "cfg_scale": 1.0, "batch": len(docs), "device": str(
                                       next(model.parameters()).device), "step": step,
                                   "date": time.strftime("%Y-%m-%d %H:%M")}}, d)
    return rec


@torch.no_grad()
def quick_eval(engine, cfg: Config, special, rank: int, world: int, device, agree=None) -> dict:
    """Mean loss parts over train.eval_batches val batches per rank (fixed generator seeds), all ranks averaged."""
    if not cfg.data.val_shards:
        return {}
    loader = build_loader(cfg.data, rank=rank, world_size=world, shards=cfg.data.val_shards,
                          split=cfg.data.val_split, loop=False, num_workers=0)
    model = engine.model
    was = model.training
    model.eval()
    sums = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64)
    gen = torch.Generator()
    uniform = engine_is_zero3(engine) and agree is not None  # ZeRO-3 forwards gather collectively
    it = iter(loader)
    for i in range(cfg.train.eval_batches):
        batch = next(it, None)
        if uniform:
            if agree.sums([float(batch is not None)])[0] < world:
                break
        elif batch is None:
            break
        gen.manual_seed(micro_seed(cfg.train.seed + 1, 0, i * world + rank))
        with engine.autocast():
            _, parts = compute_loss(model, batch.to(device), cfg.objective, special, attention=cfg.model.attention,
                                    n_heads=cfg.model.n_heads, generator=gen, uniform=uniform)
        sums += torch.tensor([float(parts.get(k, 0.0)) for k in LOSS_KEYS] + [1.0], dtype=torch.float64)
    model.train(was)
    sums = all_reduce_sum(sums, world)
    n = max(1.0, float(sums[-1]))
    return {f"val_{k}": float(v) / n for k, v in zip(LOSS_KEYS, sums[:-1]) if k in ("loss", "ce", cfg.objective.kind)}


# --------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, *, max_minutes: float = 0.0, quiet: bool = False) -> dict:
    """Run the loop; returns a summary: step, parts (last micro-batch), seconds, out, model (consolidated on
    rank 0), text_tok, image_tok, special."""
    from tqdm import tqdm

    from nextx.latents import load_image_tokenizer
    from nextx.tokenizer import load_tokenizer

    rank, world, device = init_distributed(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_all(cfg.train.seed)  # identical model init on every rank (ZeRO-3 keeps each rank's own partition)
    cfg = absolute_paths(cfg)                   # the run's config loads from any directory
    out, resume_from = find_resume(cfg, cfg.out_dir)
    if out != cfg.out_dir:
        cfg = dataclasses.replace(cfg, name=out.name)
    barrier()                                   # every rank decided before rank 0 creates or changes anything
    lock = None
    if rank == 0:
        from nextx.rundir import claim, dedup_metrics

        lock = claim(out)                       # writable now, and no second concurrent writer
        if resume_from is None and cfg.train.if_exists == "overwrite":
            _wipe_outputs(out)
        clean_partial(out)
        snapshot_tokenizers(cfg, out)           # copies + hashes; a tokenizer changed under a resume is refused
        dropped = dedup_metrics(out, load_train_state(resume_from, 0).get("step", 0) if resume_from else 0)
        if dropped:
            print0(f"metrics.jsonl: {dropped} row(s) after the resume point removed (they are replayed)")
        save_config(cfg, out / "config.yaml")
    barrier()
    text_tok = load_tokenizer(cfg.data.text_tokenizer)
    image_tok = load_image_tokenizer(cfg.data.image_tokenizer)
    special = SpecialIds.from_tokenizer(text_tok)
    model = build_model(cfg, text_tok, image_tok).to(device)
    n_params = model.num_params()
    flops_tok = token_flops(model, cfg.data.row_len)  # fwd+bwd per token (before ZeRO-3 partitions the params)
    if cfg.train.init_from and resume_from is None:
        print0(f"weights from {init_weights_from(model, cfg.train.init_from, cfg)} (train.init_from)")
    if cfg.dist.compile:
        compile_blocks(model, device)
    engine = build_engine(cfg, model)

    # ---- resume: engine state, RNG, data position
    state: dict = {}
    if resume_from is not None:
        engine.load_state(resume_from)
        state = load_train_state(resume_from, rank)
        if state.get("rng"):
            set_rng_state(state["rng"])
        if state.get("world_size", world) != world or state.get("num_workers") != cfg.data.num_workers:
            print0("warning: world size or data.num_workers changed since the checkpoint; the data streams restart "
                   "at the next epoch (not an exact resume)")
            epoch = max((e for e, _ in state.get("positions", {}).values()), default=-1) + 1
            state["positions"], state["batches"] = {}, 0
            state["epoch_floor"] = epoch
    positions: dict = dict(state.get("positions", {}))
    batches = int(state.get("batches", 0))
    if "epoch_floor" in state:
        n_readers = max(1, cfg.data.num_workers)
        positions = {rank * n_readers + w: (state["epoch_floor"], 0) for w in range(n_readers)}
    step = engine.step_count
    print0(f"model: {n_params / 1e6:.2f}M params | {cfg.dist.engine} zero {cfg.dist.zero_stage} "
           f"{cfg.dist.precision} x {world} process(es) | run dir {out}"
           + (f" | resumed from {resume_from.name}" if resume_from else ""))

    loader = build_loader(cfg.data, rank=rank, world_size=world, start=positions, batches_done=batches,
                          pin_memory=device.type == "cuda")
    examples = (fixed_examples(cfg, text_tok, image_tok, cfg.train.sample_prompts)
                if cfg.train.sample_every else ([], None))
    rep_docs = report_docs(cfg)
    metrics = Metrics(out, enabled=rank == 0)
    peak = peak_flops(cfg, device)
    bar = tqdm(total=cfg.train.steps, initial=step, disable=quiet or rank != 0 or not sys.stderr.isatty(),
               dynamic_ncols=True, desc="train")
    say = bar.write if not bar.disable else print0

    stopper = StopOnSignal(say)
    gen = torch.Generator()
    t0 = t_last = time.perf_counter()
    acc = new_accumulator()
    parts: dict = {}
    last_saved = step
    stop = step >= cfg.train.steps
    engine.model.train()
    it = iter(loader)
    agree = RankAgreement(world) if cfg.dist.engine == "deepspeed" and world > 1 else None
    micro = 0  # micro-batch index within the current optimizer step
    bad_run = bad_steps = 0  # non-finite losses (micro-batches) and gradients (steps) in a row
    try:
        while not stop:
            batch = next(it)
            positions[batch.position[0]] = batch.position[1:]
            batches += 1
            count_batch(acc, batch, flops_tok)
            gen.manual_seed(micro_seed(cfg.train.seed, step, micro * world + rank))
            micro += 1
            batch = batch.to(device, non_blocking=True)
            with engine.autocast():
                loss, parts = compute_loss(engine.model, batch, cfg.objective, special, attention=cfg.model.attention,
                                           n_heads=cfg.model.n_heads, generator=gen, step=engine.step_count,
                                           uniform=agree is not None)
            if cfg.train.max_nonfinite and not _finite(loss, agree):
                acc["nonfinite"] += 1
                bad_run += 1
                say(f"step {engine.step_count + 1}: non-finite loss ({_parts_text(parts)}); micro-batch skipped "
                    f"({bad_run} in a row)")
                if bad_run >= cfg.train.max_nonfinite:
                    raise _diverged(f"{bad_run} non-finite losses in a row", engine.step_count + 1, parts, out, cfg)
                continue
            bad_run = 0
            engine.backward(loss)
            info = engine.step()
            for k in LOSS_KEYS:                   # device tensors: summed there in float64, read at the log step
                v = parts.get(k, 0.0)
                acc["loss_sums"][k] += v.double() if isinstance(v, torch.Tensor) else v
            for k in COUNT_KEYS:
                acc["counts"][k] += parts.get(k, 0)
            acc["micro"] += 1
            if info is None:
                continue
            if info.get("nonfinite_grad"):  # plain engine: the update was dropped; the step is redone
                micro = 0
                acc["nonfinite"] += 1
                bad_steps += 1
                say(f"step {engine.step_count + 1}: non-finite gradient norm; update dropped ({bad_steps} in a row)")
                if bad_steps >= cfg.train.max_nonfinite:
                    raise _diverged(f"{bad_steps} non-finite gradients in a row", engine.step_count + 1, parts, out,
                                    cfg)
                continue
            bad_steps = 0
            micro = 0  # checkpoints fall on step boundaries, so a resumed run starts at micro 0 too
            step = engine.step_count
            bar.update(1)
            fault_point("step", step)
            is_log = step % cfg.train.log_every == 0 or step >= cfg.train.steps
            timed_out = bool(max_minutes) and time.perf_counter() - t0 > 60 * max_minutes
            if world > 1:  # decided at log steps only, by all ranks together (the flag is all-reduced)
                timed_out = timed_out and is_log
            if agree is not None:  # a signal any rank received stops all after this step (a CPU all-reduce)
                stopper.agree(agree)
            if is_log or timed_out:
                now = time.perf_counter()
                rec, timed_out = log_record(acc, info, step, now - t_last, now - t0, world, peak, device, cfg,
                                             timed_out)
                metrics.write(rec)
                if not quiet:
                    say(fmt_record(rec))
                t_last, acc = now, new_accumulator()
                if not math.isfinite(rec.get("loss", 0.0)):  # train.max_nonfinite=0: no per-step check, this one
                    raise _diverged(f"the mean loss since the last log step is {rec['loss']}", step, parts, out, cfg)
            t_extra = time.perf_counter()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                ev = quick_eval(engine, cfg, special, rank, world, device, agree)
                if ev:
                    metrics.write({"step": step, **ev})
                    if not quiet:
                        say(fmt_record({"step": step, **ev}))
            if cfg.train.sample_every and step % cfg.train.sample_every == 0 and (engine_is_zero3(engine) or rank == 0):
                sample_grid(engine.module, cfg, examples, text_tok, image_tok, special, out, step, device)
            if cfg.train.report_every and step % cfg.train.report_every == 0 and (engine_is_zero3(engine) or rank == 0):
                rec = periodic_report(engine.module, cfg, rep_docs, text_tok, image_tok, special, out, step)
                metrics.write(rec)
                if not quiet:
                    say(fmt_record(rec))
            stop = step >= cfg.train.steps or timed_out or stopper.signal is not None
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != last_saved:
                _save(out, engine, cfg, step, positions, batches, world)
                last_saved = step
            t_last += time.perf_counter() - t_extra  # rates count training time only
    finally:  # the workers ignore SIGINT/SIGTERM (StopOnSignal), so ask them to exit, also on errors
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    bar.close()
    if step != last_saved:
        _save(out, engine, cfg, step, positions, batches, world)
    export(out, engine, cfg, step)
    metrics.close()
    stopper.restore()
    if stopper.signal is not None:
        say(f"stopped by {stopper.signal.name} at step {step}: checkpoint {out / 'checkpoints' / 'latest'} "
            "(the same command resumes)")
    if lock is not None:
        lock.release()
    final = _final_model(engine, cfg, text_tok, image_tok, device)
    return {"step": step, "parts": {k: float(v) for k, v in parts.items()}, "seconds": time.perf_counter() - t0,
            "signal": stopper.signal,
            "out": str(out), "model": final, "text_tok": text_tok, "image_tok": image_tok, "special": special}


def engine_is_zero3(engine) -> bool:
    return bool(getattr(engine, "zero3", False))


class RankAgreement:
    """Small agreements between ranks over gloo on the CPU (no device sync): whether every rank still has a val
    batch, a signal any rank received, a non-finite loss on any rank. (Ranks never need to agree on the data:
    with several ranks the graph is the same whatever a micro-batch holds, engine._DSNet.)"""

    def __init__(self, world: int):
        self.world = world
        self.group = None
        if world > 1 and torch.distributed.get_backend() != "gloo":
            self.group = torch.distributed.new_group(backend="gloo")

    def sums(self, flags: list[float]) -> list[float]:
        t = torch.tensor(flags, dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(t, group=self.group)
        return t.tolist()


class NumericError(UserError):
    """Training diverged: train.max_nonfinite non-finite losses in a row."""


def _finite(loss: torch.Tensor, agree: "RankAgreement | None") -> bool:
    """Is the loss finite on every rank? One host sync (and a CPU all-reduce with several ranks, so that all ranks
    skip the same micro-batch and their collectives stay matched)."""
    bad = float(not bool(torch.isfinite(loss)))
    if agree is not None:
        bad = agree.sums([bad])[0]
    return bad == 0


def _diverged(what: str, step: int, parts: dict, out: Path, cfg: Config) -> NumericError:
    """The error that stops a diverged run: what happened, the loss parts, and the checkpoint to go back to."""
    return NumericError(f"step {step}: {what} (train.max_nonfinite={cfg.train.max_nonfinite}; last parts: "
                        f"{_parts_text(parts)}); the run stopped. Last good checkpoint: "
                        f"{latest_checkpoint(out) or 'none yet'}. Lower optim.lr or check the data, then run the same "
                        "command to resume")


def _parts_text(parts: dict) -> str:
    return ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items() if k in LOSS_KEYS)


class StopOnSignal:
    """SIGINT and SIGTERM (Ctrl-C, SLURM pre-emption) set `signal`; the loop then stops at the end of the step
    (with several ranks: at the next log step, decided by all ranks together), saves and exports. A second signal
    aborts at once. Handlers are installed only in the main thread and restored by `restore()`."""

    def __init__(self, say):
        import signal as sig
        import threading

        self.signal = None
        self._say = say
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (sig.SIGINT, sig.SIGTERM):
                self._old[s] = sig.signal(s, self._handle)

    def _handle(self, signum, frame):
        import signal as sig

        if self.signal is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signal = sig.Signals(signum)
        self._say(f"{self.signal.name}: stopping after this step with a checkpoint (send it again to abort now)")

    def agree(self, agree: "RankAgreement") -> None:
        """With several ranks: a signal any rank received stops them all after this step."""
        import signal as sig

        if agree.sums([float(self.signal is not None)])[0] > 0 and self.signal is None:
            self.signal = sig.SIGTERM

    def restore(self) -> None:
        import signal as sig

        for s, h in self._old.items():
            sig.signal(s, h)
        self._old = {}


def _save(out: Path, engine, cfg: Config, step: int, positions: dict, batches: int, world: int) -> None:
    save_checkpoint(out, engine, cfg, step, keep=cfg.train.keep_checkpoints,
                    train_state={"positions": dict(positions), "batches": batches, "world_size": world,
                                 "num_workers": cfg.data.num_workers})
    if cfg.train.export_on_save:
        export(out, engine, cfg, step)


def _final_model(engine, cfg: Config, text_tok, image_tok, device):
    """The trained module; under ZeRO-3 a fresh copy holding the gathered weights (rank 0)."""
    if not engine_is_zero3(engine):
        return engine.module
    sd = engine.full_state_dict()
    if sd is None:
        return engine.module
    m = build_model(cfg, text_tok, image_tok)
    m.load_state_dict(sd)
    return m.to(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (configs/tiny.yaml, configs/small.yaml, configs/base.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100 optim.lr=1e-3")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time (0 = no limit)")
    p.add_argument("--quiet", action="store_true", help="no log lines on stdout (metrics.jsonl still written)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    a = p.parse_args(argv)
    if a.max_minutes < 0:
        p.error(f"--max-minutes must be >= 0 (0 = no limit), got {a.max_minutes:g}")
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    s = train(cfg, max_minutes=a.max_minutes, quiet=a.quiet)
    print0(f"{'stopped' if s['signal'] else 'done'}: {s['step']} steps in {s['seconds']:.0f} s -> {s['out']}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 128 + int(s["signal"]) if s["signal"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
