"""Checkpoints and exports: `checkpoints/step_N/` + a `latest` pointer, never left pointing at a partial save.

Layout of a run directory:

    runs/<name>/config.yaml                    the resolved config
    runs/<name>/metrics.jsonl                  one JSON line per log step (the same dict goes to TensorBoard, tb/)
    runs/<name>/checkpoints/latest             text file: the name of the newest complete checkpoint
    runs/<name>/checkpoints/step_0000100/      engine state + train_state_rank*.pt + config.yaml
    runs/<name>/exports/step_0000100/          model.safetensors (+ ema.safetensors) + config.yaml, for inference
    runs/<name>/samples/                       sample grids and captions (train.sample_every)

Engine state: the plain engine writes `state.pt` (model, optimizer, step, EMA); DeepSpeed writes its own files
(`mp_rank_00_model_states.pt`, `*_optim_states.pt` per ZeRO partition) plus `ema_rank*.pt`. Every rank writes its
`train_state_rankNNNNN.pt`: step, data read position, consumed-batch count, RNG states (python, numpy, torch CPU and
CUDA). The objective's generator needs no state: it is re-seeded from (seed, step, micro-batch) every micro-batch.

Atomicity: everything is written into `.tmp_step_N/` (DeepSpeed is told that tag, with its own `latest` off), then
rank 0 renames it to `step_N/` (atomic on one filesystem) and only then replaces `latest` by an atomic rename. A
crash at any point leaves `latest` naming the previous complete checkpoint; the stale `.tmp_*` is removed by the
next save or resume.

Export: the consolidated fp32 state dict (gathered parameter by parameter under ZeRO-3) as safetensors, written the
same way (`.tmp_` dir, rename). `load_for_inference` reads an export, a plain `state.pt`, or a DeepSpeed checkpoint
(ZeRO-3 partitions consolidated with DeepSpeed's zero_to_fp32).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from nextx.config import Config, load_config, save_config
from nextx.errors import UserError

LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if _rank_world()[1] > 1:
        torch.distributed.barrier()


def fault_point(where: str, step: int) -> None:
    """Test hook: NEXTX_FAULT=where:step (e.g. save:4, step:3) SIGKILLs this process there (a real crash);
    NEXTX_FAULT=sigterm:3 / sigint:3 sends itself that signal after step 3 (pre-emption, Ctrl-C)."""
    spec = os.environ.get("NEXTX_FAULT", "")
    if not spec:
        return
    if spec == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "step" and spec in (f"sigterm:{step}", f"sigint:{step}"):
        os.kill(os.getpid(), signal.SIGTERM if spec.startswith("sigterm") else signal.SIGINT)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass


def _publish(tmp: Path, final: Path) -> None:
    """Rename a fully written tmp dir into place (replacing an older one of the same name)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_pointer(ck: Path, name: str) -> None:
    tmp = ck / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ck / LATEST)
    _fsync_dir(ck)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_checkpoint(out: Path, engine, cfg: Config, step: int, *,
                    train_state: dict | None = None, keep: int = 0) -> Path:
    """All ranks: write checkpoints/step_N/ atomically and point `latest` at it. Returns the directory.

    train_state: this rank's client state (data position, ...).
    keep > 0 deletes all but the newest `keep` checkpoints afterwards."""
    rank, _ = _rank_world()
    ck = Path(out) / "checkpoints"
    d, tmp = ck / step_name(step), ck / f".tmp_{step_name(step)}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_state(tmp)
    state = {"step": step, "rng": rng_state(), **(train_state or {})}
    torch.save(state, tmp / f"train_state_rank{rank:05d}.pt")
    if rank == 0:
        save_config(cfg, tmp / "config.yaml")
    fault_point("save", step)
    barrier()
    if rank == 0:
        _publish(tmp, d)
        _write_pointer(ck, d.name)
        if keep > 0:
            done = sorted(p for p in ck.glob("step_*") if p.is_dir())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return d


def clean_partial(out: Path) -> None:
    """Rank 0: remove `.tmp_*` dirs a crash left behind in checkpoints/ and exports/."""
    for sub in ("checkpoints", "exports"):
        for p in (Path(out) / sub).glob(".tmp_*"):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The step dir `checkpoints/latest` names, or None."""
    ptr = Path(out) / "checkpoints" / LATEST
    if not ptr.is_file():
        return None
    d = ptr.parent / ptr.read_text().strip()
    return d if d.is_dir() else None


def load_train_state(d: Path, rank: int) -> dict:
    f = Path(d) / f"train_state_rank{rank:05d}.pt"
    if not f.is_file():
        return {}
    return torch.load(f, map_location="cpu", weights_only=False)


def export(out: Path, engine, cfg: Config, step: int) -> Path | None:
    """All ranks (a collective under ZeRO-3): exports/step_N/{model.safetensors, ema.safetensors, config.yaml}."""
    from safetensors.torch import save_file

    rank, _ = _rank_world()
    sd = engine.full_state_dict()
    ema = engine.full_state_dict(ema=True) if getattr(engine, "ema", None) is not None else None
    if rank != 0:
        barrier()
        return None
    ex = Path(out) / "exports"
    d, tmp = ex / step_name(step), ex / f".tmp_{step_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"),
                  metadata={"step": str(step), "decay": str(cfg.optim.ema_decay)})
    save_config(cfg, tmp / "config.yaml")
    _publish(tmp, d)
    barrier()
    return d


# --------------------------------------------------------------------------------------------------------
# Reading for inference


def _is_deepspeed_dir(p: Path) -> bool:
    """DeepSpeed model states: mp_rank_00_model_states.pt (ZeRO 0-2) or zero_pp_rank_*_model_states.pt (ZeRO-3)."""
    return any(p.glob("*model_states.pt"))


def _is_step_dir(p: Path) -> bool:
    return (p / "model.safetensors").is_file() or (p / "state.pt").is_file() or _is_deepspeed_dir(p)


def resolve(path: str | Path) -> Path:
    """A run dir, a checkpoints dir, an exports dir or a step dir -> the dir to load.

    A run dir resolves to the export of its latest checkpoint when there is one, else to the checkpoint."""
    p = Path(path)
    if (p / "checkpoints" / LATEST).is_file():
        d = p / "checkpoints" / (p / "checkpoints" / LATEST).read_text().strip()
        ex = p / "exports" / d.name
        return ex if (ex / "model.safetensors").is_file() else d
    if (p / LATEST).is_file():
        return p / (p / LATEST).read_text().strip()
    if _is_step_dir(p):
        return p
    for exports in (p / "exports", p):
        found = sorted(q for q in exports.glob("step_*") if (q / "model.safetensors").is_file())
        if found:
            return found[-1]
    raise CheckpointError(f"{p}: no checkpoint found (expected a run dir with checkpoints/latest or exports/, a "
                            "checkpoints dir with latest, or a step dir with model.safetensors, state.pt or "
                            "DeepSpeed files)")


def _strip(sd: dict, prefix: str = "net.") -> dict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint that cannot be loaded: missing, unreadable, of another model shape, or with NaN/inf weights."""


def read_state_dict(d: Path, cfg: Config, *, ema: bool = False) -> dict:
    """The model's fp32 state dict from a step dir of any kind (see `resolve`). A file that cannot be read is a
    CheckpointError naming it."""
    d = Path(d)
    try:
        return _read_state_dict(d, cfg, ema=ema)
    except (CheckpointError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip readers each raise their own types
        raise CheckpointError(f"{d}: the checkpoint files cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); it is corrupt or incomplete: "
                              f"load another step (checkpoints/step_N) or re-export it") from None


def check_weights(sd: dict, where: Path | str) -> None:
    """Refuse non-finite weights (a diverged run saved them): name the file and the first tensors."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}): the run diverged before this save; load an "
                              "earlier checkpoint (checkpoints/step_N)")


def load_weights(model, sd: dict, where: Path | str) -> None:
    """model.load_state_dict(sd), with a mismatch summarised in two lines instead of one per tensor."""
    own = model.state_dict()
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing, extra = [k for k in own if k not in sd], [k for k in sd if k not in own]
    if shapes or missing or extra:
        first = (f"first: {shapes[0][0]} {shapes[0][1]} in the checkpoint vs {shapes[0][2]} in the model"
                 if shapes else f"first missing: {missing[0]}" if missing else f"first unexpected: {extra[0]}")
        raise CheckpointError(f"{where} does not fit the model its config.yaml describes: {len(shapes)} tensor(s) of "
                              f"another shape, {len(missing)} missing, {len(extra)} unexpected ({first}). Was the "
                              "checkpoint copied from another run, or config.yaml edited?")
    model.load_state_dict(sd)


def _read_state_dict(d: Path, cfg: Config, *, ema: bool = False) -> dict:
    if (d / "model.safetensors").is_file():
        from safetensors.torch import load_file

        f = d / ("ema.safetensors" if ema else "model.safetensors")
        if not f.is_file():
            raise CheckpointError(f"{f}: this export has no EMA weights (optim.ema_decay was 0)")
        return load_file(str(f))
    if (d / "state.pt").is_file():
        sd = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
        if ema:
            raise CheckpointError(f"{d}: EMA weights are read from exports (exports/step_N/ema.safetensors)")
        return sd["model"]
    if _is_deepspeed_dir(d):
        if ema:
            raise CheckpointError(f"{d}: EMA weights are read from exports (exports/step_N/ema.safetensors)")
        if not (d / "mp_rank_00_model_states.pt").is_file():  # ZeRO-3: parameters live in the partitions
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return _strip(get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name))
        sd = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return _strip({k: v.float() if v.is_floating_point() else v for k, v in sd["module"].items()})
    raise CheckpointError(f"{d}: no model.safetensors, state.pt or DeepSpeed model states")


def load_run_config(path: Path) -> Config:
    """A run's saved config.yaml -> Config, reading fields added since the run was saved as the values the run
    actually used: a config without `model.rope2d_freqs` was written before that option existed, when the 2D RoPE
    pairs turned at the shared 1D ladder; one without `objective.null_prompt`, when the null prompt was the
    caption's ids replaced by <pad> in place."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    legacy = []
    if "rope2d_freqs" not in (raw.get("model") or {}):
        legacy.append("model.rope2d_freqs=shared")
    if "null_prompt" not in (raw.get("objective") or {}):
        legacy.append("objective.null_prompt=pad")
    return load_config(path, legacy)


# --------------------------------------------------------------------------------------------------------
# Self-contained runs: absolute paths, and the tokenizers copied in with their content hashes

PATH_FIELDS = ("train_shards", "val_shards", "text_tokenizer", "image_tokenizer")
TOKENIZERS = "tokenizers"          # RUN/tokenizers/{text,image}/ + manifest.json


def absolute_paths(cfg: Config) -> Config:
    """The config with run_dir, its data paths and train.init_from made absolute where they exist from the current
    directory (a run then loads, and resumes from its own config.yaml, from anywhere). Brace patterns and missing
    paths stay as they are."""
    import dataclasses

    new = {}
    for f in PATH_FIELDS:
        v = getattr(cfg.data, f)
        if v and "{" not in v and Path(v).exists():
            new[f] = str(Path(v).resolve())
    train = cfg.train
    if train.init_from and Path(train.init_from).exists():
        train = dataclasses.replace(train, init_from=str(Path(train.init_from).resolve()))
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()),
                               data=dataclasses.replace(cfg.data, **new), train=train)


def content_hash(path: str | Path) -> str:
    """sha256 over a file, or over every file of a directory (relative names and bytes, sorted)."""
    import hashlib

    p, h = Path(path), hashlib.sha256()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for q in files:
        h.update(str(q.relative_to(p) if q != p else q.name).encode() + b"\0")
        h.update(q.read_bytes())
    return h.hexdigest()


def snapshot_tokenizers(cfg: Config, out: Path) -> None:
    """Copy the run's tokenizers into RUN/tokenizers/ with their hashes (manifest.json), once. On a resume, a
    tokenizer that changed at its source since the run began is refused: it would silently change the model."""
    import json

    d = out / TOKENIZERS
    man_f = d / "manifest.json"
    manifest = json.loads(man_f.read_text()) if man_f.is_file() else {}
    for kind, src in (("text", cfg.data.text_tokenizer), ("image", cfg.data.image_tokenizer)):
        src_p = Path(src)
        if not src_p.exists():
            raise CheckpointError(f"data.{kind}_tokenizer: {src} not found")
        digest = content_hash(src_p)
        if kind in manifest:
            if manifest[kind]["sha256"] != digest:
                raise CheckpointError(
                    f"data.{kind}_tokenizer {src} changed since this run began (its files' sha256 differs from "
                    f"{man_f}); training on would silently change what the model's ids mean. Restore the tokenizer, "
                    f"or start a new run (another name=)")
            continue
        dst = d / kind / src_p.name
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src_p, dst) if src_p.is_dir() else shutil.copy2(src_p, dst)
        manifest[kind] = {"source": str(src_p.resolve()), "copy": str(dst.relative_to(out)), "sha256": digest}
    man_f.write_text(json.dumps(manifest, indent=2))


def run_tokenizers(step_dir: Path) -> tuple[str, str] | None:
    """The (text, image) tokenizer copies of the run that holds `step_dir` (RUN/{checkpoints,exports}/step_N), after
    checking their hashes; None for runs saved before tokenizers were copied in."""
    import json

    run = Path(step_dir).resolve().parent.parent
    man_f = run / TOKENIZERS / "manifest.json"
    if not man_f.is_file():
        return None
    manifest = json.loads(man_f.read_text())
    paths = []
    for kind in ("text", "image"):
        p = run / manifest[kind]["copy"]
        if not p.exists() or content_hash(p) != manifest[kind]["sha256"]:
            raise CheckpointError(f"{p}: the run's copy of its {kind} tokenizer is missing or was changed (sha256 "
                                  f"differs from {man_f}); the model's ids would mean something else")
        paths.append(str(p))
    return paths[0], paths[1]


def init_weights_from(model, path: str | Path, cfg: Config) -> Path:
    """Start `model` (built from `cfg`) from the weights of another run (`train.init_from`: a run dir, an export or a
    checkpoint step dir; see `resolve`): a fine-tune or the next phase of a curriculum. Only weights move: optimizer,
    schedule, step and data start fresh. The model sections must agree (hf_init aside) and the tokenizers must have
    the same content, else the weights would mean something else: each is a CheckpointError naming the difference.
    -> the step dir loaded."""
    import dataclasses

    d = resolve(path)
    src = load_run_config(d / "config.yaml")
    a = {k: v for k, v in dataclasses.asdict(src.model).items() if k != "hf_init"}
    b = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "hf_init"}
    diff = [f"model.{k}: {a[k]!r} there, {b.get(k)!r} here" for k in a if a[k] != b.get(k)]
    if diff:
        raise CheckpointError(f"train.init_from {path}: its model differs from this run's ({'; '.join(diff[:4])})")
    own = run_tokenizers(d) or (src.data.text_tokenizer, src.data.image_tokenizer)
    for kind, theirs, ours in (("text", own[0], cfg.data.text_tokenizer), ("image", own[1], cfg.data.image_tokenizer)):
        if not Path(theirs).exists():
            raise CheckpointError(f"train.init_from {path}: its {kind} tokenizer {theirs} is not found, so it cannot be "
                                  f"checked against data.{kind}_tokenizer")
        if content_hash(theirs) != content_hash(ours):
            raise CheckpointError(f"train.init_from {path}: its {kind} tokenizer ({theirs}) differs from "
                                  f"data.{kind}_tokenizer ({ours}); the ids would mean something else")
    sd = read_state_dict(d, src)
    check_weights(sd, d)
    load_weights(model, sd, d)
    return d


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", *, ema: bool = False):
    """-> (model in eval mode, cfg, text tokenizer, image tokenizer, SpecialIds) from an export or a checkpoint.

    path: a run dir (its latest export, else its latest checkpoint), a checkpoints/exports step dir. ema=True
    loads the EMA weights of an export."""
    from nextx.latents import load_image_tokenizer
    from nextx.sequence import SpecialIds
    from nextx.tokenizer import load_tokenizer
    from nextx.pretrained import build_model

    import dataclasses

    d = resolve(path)
    cfg = load_run_config(d / "config.yaml")
    own = run_tokenizers(d)  # the run's own copies (hash-checked), so any directory and any later retraining works
    if own is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, text_tokenizer=own[0],
                                                                 image_tokenizer=own[1]))
    else:
        for kind in ("text", "image"):
            src = getattr(cfg.data, f"{kind}_tokenizer")
            if not Path(src).exists():
                raise CheckpointError(f"{d}: its {kind} tokenizer {src!r} is not found from {Path.cwd()} (runs saved "
                                      "before tokenizers were copied into the run store the path as given to training: "
                                      "run from that directory, or edit data.*_tokenizer in its config.yaml)")
    text_tok = load_tokenizer(cfg.data.text_tokenizer)
    image_tok = load_image_tokenizer(cfg.data.image_tokenizer)
    cfg.model.hf_init = ""  # the checkpoint holds every weight
    model = build_model(cfg, text_tok, image_tok)
    sd = read_state_dict(d, cfg, ema=ema)
    check_weights(sd, d)
    load_weights(model, sd, d)
    return model.to(device).eval(), cfg, text_tok, image_tok, SpecialIds.from_tokenizer(text_tok)
