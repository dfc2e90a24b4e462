"""The training engine built from the typed config: the loop calls only `backward(loss)` and `step()`.

Two engines with one interface (docs/design.md §8, STYLE §2.8):

  plain       single-process torch (CPU debugging, the learning proofs): AdamW, warmup + cosine/constant lr,
              global-norm clipping, fp32 or bf16 autocast, gradient accumulation.
  deepspeed   DeepSpeed ZeRO stage 0-3 from `deepspeed_config(cfg)`, a pure function of the typed config, deep-merged
              with `dist.deepspeed_json` when given. The same code runs on CPU (gloo) and GPU (nccl).

Choices (why):
  * The optimizer is always torch AdamW, handed to DeepSpeed (`zero_allow_untested_optimizer`): DeepSpeed's own
    "AdamW" JIT-builds a fused kernel (~80 s on a fresh machine, DEPS.md); on GPU torch's fused AdamW is used.
  * The learning rate is `lr_at(step)` written into the param groups before each optimizer step (no scheduler
    object to checkpoint: the step count is the whole schedule state).
  * `dist.precision: bf16` is torch autocast over fp32 weights, for both engines. DeepSpeed sees an fp32 model (its
    "bf16" section stays off), so the IMM time path and target pass really run in fp32 (docs/imm.md §9) and gradients
    are reduced in fp32. An advanced user may still switch on DeepSpeed's bf16 weights through the JSON.
  * DeepSpeed wraps the model in `_DSNet`, whose forward returns the ModelOutput as a dict (`_Out`, attribute
    access kept): DeepSpeed registers its backward-prologue hooks only on tensors inside tuples/lists/dicts, and
    without that prologue ZeRO never learns the gradient-accumulation boundary.
  * EMA (`optim.ema_decay > 0`): under ZeRO 0-2 every rank keeps a full fp32 copy; under ZeRO-3 each rank keeps
    the EMA of its own parameter partition (`p.ds_tensor`), gathered only for export.
  * Activation checkpointing is the model's own (`model.activation_checkpointing`, torch.utils.checkpoint);
    DeepSpeed's "activation_checkpointing" section applies only to its own checkpointing API and is not used.

Interface: `engine.model` (what the objective calls), `engine.module` (the NextX), `engine.backward(loss)`,
`engine.step() -> {"lr", "grad_norm"} | None` (None between accumulation boundaries; grad_norm may be a tensor:
the loop converts it at log steps only), `engine.autocast()`, `engine.step_count`, `engine.save_state(dir)` /
`engine.load_state(dir)` (all ranks), `engine.full_state_dict(ema=False)` (consolidated, rank 0; a collective
under ZeRO-3), and for the plain engine `state_dict()` / `load_state_dict(sd)`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path

import torch

from nextx.config import Config, ConfigError, OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup to cfg.lr over warmup_steps, then
    constant or cosine decay to cfg.lr * min_lr_ratio at total_steps.

    E.g. lr=1, warmup=10, total=110, cosine, floor 0.1: step 0 -> 0.1, 9 -> 1.0, 60 -> 0.55, 110 -> 0.1."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim >= 2) except embeddings; none on norms, biases, embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.AdamW:
    """torch AdamW on the decay / no-decay groups; torch's fused kernel on CUDA (one launch for all tensors) and on
    CPU (one pass over each tensor: 1.2 against 3.2 ms a step for the demo's 61 tensors, 1.46 M parameters, one
    thread), unless ZeRO offload moves the optimizer states (and the step) elsewhere."""
    o = cfg.optim
    fused = next(model.parameters()).device.type in ("cuda", "cpu") and not cfg.dist.offload_optimizer
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=lr_at(0, o, cfg.train.steps),
                             betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def _autocast(cfg: Config, device: torch.device):
    if cfg.dist.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class EMA:
    """w_ema <- d * w_ema + (1 - d) * w after every optimizer step, on a list of fp32 tensors (full parameters,
    or under ZeRO-3 this rank's partitions). The first update after init copies nothing special: the EMA starts
    at the initial weights (no bias correction; use decays whose horizon is short next to the run)."""

    def __init__(self, tensors: list[torch.Tensor], decay: float):
        self.decay = decay
        self.tensors = tensors
        self.shadow = [t.detach().float().clone() for t in tensors]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [t.float() for t in self.tensors], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(sd['shadow'])} tensors, the model {len(self.shadow)}")
        for s, x in zip(self.shadow, sd["shadow"]):
            s.copy_(x)


# --------------------------------------------------------------------------------------------------------
# Plain torch engine


class PlainEngine:
    """Single-process engine: torch AdamW, lr schedule, clipping, optional bf16 autocast, grad accumulation."""

    def __init__(self, cfg: Config, model: torch.nn.Module):
        self.cfg, self.model, self.module = cfg, model, model
        self.optimizer = make_optimizer(cfg, model)
        self.ema = EMA(list(model.parameters()), cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.step_count = 0
        self._micro = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        return _autocast(self.cfg, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.dist.grad_accum).backward()
        self._micro += 1

    def step(self) -> dict | None:
        """Apply an optimizer step once every `grad_accum` micro-batches; returns the step's lr and grad norm
        (a 0-dim tensor: reading it is a host sync, left to the log steps). With train.max_nonfinite > 0, a
        non-finite gradient norm drops the step instead (no update, step count unchanged): {"nonfinite_grad": True}."""
        if self._micro % self.cfg.dist.grad_accum:
            return None
        o = self.cfg.optim
        lr = lr_at(self.step_count, o, self.cfg.train.steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = o.grad_clip if o.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if self.cfg.train.max_nonfinite and not bool(torch.isfinite(norm)):  # a NaN/inf gradient: no update
            self.optimizer.zero_grad(set_to_none=True)
            return {"lr": lr, "grad_norm": norm.detach(), "nonfinite_grad": True}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step_count += 1
        return {"lr": lr, "grad_norm": norm.detach()}

    def state_dict(self) -> dict:
        sd = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step_count}
        if self.ema is not None:
            sd["ema"] = self.ema.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.step_count = int(sd["step"])
        if self.ema is not None and "ema" in sd:
            self.ema.load_state_dict(sd["ema"])

    def save_state(self, d: Path) -> None:
        torch.save(self.state_dict(), Path(d) / "state.pt")

    def load_state(self, d: Path) -> None:
        self.load_state_dict(torch.load(Path(d) / "state.pt", map_location=self.device, weights_only=False))

    def full_state_dict(self, ema: bool = False) -> dict | None:
        sd = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if ema and self.ema is not None:
            names = {id(p): n for n, p in self.model.named_parameters()}
            for p, s in zip(self.ema.tensors, self.ema.shadow):
                sd[names[id(p)]] = s.cpu().clone()
            _fill_tied(self.model, sd)
        return sd


def _fill_tied(model: torch.nn.Module, sd: dict) -> None:
    """Copy a tied parameter's value to every state-dict key that names it (named_parameters lists it once)."""
    by_id: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(v), []).append(k)
    for keys in by_id.values():
        for k in keys[1:]:
            sd[k] = sd[keys[0]].clone()


# --------------------------------------------------------------------------------------------------------
# DeepSpeed engine


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed config derived from the typed config (pure; no world size, no file reads).

    train_batch_size is left for DeepSpeed to derive (micro x accumulation x data-parallel ranks)."""
    d, o = cfg.dist, cfg.optim
    zero: dict = {"stage": d.zero_stage}
    if d.zero_stage >= 1:
        zero["contiguous_gradients"] = True
        if d.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # exports gather on their own (full_state_dict)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_rows,
        "gradient_accumulation_steps": d.grad_accum,
        "gradient_clipping": o.grad_clip,           # 0 = off
        "zero_optimization": zero,
        "bf16": {"enabled": False},                  # bf16 = torch autocast over fp32 weights (module docstring)
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,       # torch AdamW, not a JIT-built DeepSpeed optimizer
        "zero_force_ds_cpu_optimizer": False,        # offload keeps torch AdamW (no JIT-built CPU Adam)
        "steps_per_print": 2**31 - 1,                # the loop logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def deep_merge(base: dict, over: dict) -> dict:
    """A new dict: `over`'s keys replace `base`'s, recursively for keys that are mappings in both."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# Keys the loop owns: a JSON that changes them would silently disagree with what the loop does.
_LOOP_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_REFUSED_KEYS = ("optimizer", "scheduler", "train_batch_size")


def resolved_deepspeed_config(cfg: Config) -> dict:
    """deepspeed_config(cfg) deep-merged with the JSON file at dist.deepspeed_json (if any), checked."""
    ds = deepspeed_config(cfg)
    path = cfg.dist.deepspeed_json
    if not path:
        return ds
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dist.deepspeed_json: {path!r} is not a file")
    try:
        over = json.loads(p.read_text())
    except ValueError as e:
        raise ConfigError(f"dist.deepspeed_json: {path} is not valid JSON ({e})") from None
    if not isinstance(over, dict):
        raise ConfigError(f"dist.deepspeed_json: {path} must hold a JSON object")
    bad = [k for k in _REFUSED_KEYS if k in over]
    if bad:
        raise ConfigError(f"dist.deepspeed_json: {bad[0]!r} is not allowed: the optimizer and lr schedule come "
                          f"from optim.*, the batch from data.batch_rows x dist.grad_accum x ranks")
    for k in _LOOP_KEYS:
        if k in over and over[k] != ds[k]:
            raise ConfigError(f"dist.deepspeed_json: {k}={over[k]} disagrees with the config ({ds[k]}); set "
                              f"data.batch_rows / dist.grad_accum instead")
    return deep_merge(ds, over)


class _Out(dict):
    """ModelOutput as a dict (DeepSpeed hooks the tensors it finds in dicts) with attribute access kept."""

    __getattr__ = dict.__getitem__


class _DSNet(torch.nn.Module):
    """What DeepSpeed wraps: the model, with its output turned into an `_Out` (see the module docstring).

    With several ranks, DeepSpeed reduces gradients in buckets filled in the order the gradients arrive, so every
    rank must produce gradients for the same parameters in the same order: the backward graph must not depend on
    the data. Three data-dependent branches exist, each made uniform with several ranks. (1) The objective leaves
    the text logits out of the loss when a micro-batch has no text target (the LM head then gets no gradient):
    `uniform` adds 0 x (one row of the logits) to latent_out, so the LM head is always in the graph (cost: one zero
    row-gradient). (2) The model runs its time path, adaLN and latent convolutions only on image tokens:
    `NextX.uniform_graph` runs them on empty selections when there are none. (3) The IMM target pass (a second,
    no-grad forward, which under ZeRO-3 gathers every parameter) runs on every micro-batch
    (`objective.compute_loss(uniform=True)`), on one row with zero weight when nothing is generated."""

    def __init__(self, net: torch.nn.Module, uniform: bool = False):
        super().__init__()
        self.net = net
        self.uniform = uniform
        if uniform and hasattr(net, "uniform_graph"):
            net.uniform_graph = True

    def forward(self, *args, **kwargs):
        out = self.net(*args, **kwargs)
        latent_out = out.latent_out
        if self.uniform and torch.is_grad_enabled():
            latent_out = latent_out + (out.text_logits[:1].sum() * 0.0).to(latent_out.dtype)
        return _Out(text_logits=out.text_logits, latent_out=latent_out, past=out.past)


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 behind the PlainEngine interface. Needs torch.distributed initialised (the loop does it
    with `init_distributed`)."""

    def __init__(self, cfg: Config, model: torch.nn.Module):
        import deepspeed

        self.cfg, self.module = cfg, model
        self.ds_config = resolved_deepspeed_config(cfg)
        self.optimizer = make_optimizer(cfg, model)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        net = _DSNet(model, uniform=world > 1)
        self.ds, _, _, _ = deepspeed.initialize(model=net, optimizer=self.optimizer, config=self.ds_config)
        self.model = self.ds                               # the objective calls the DeepSpeed engine
        self.zero3 = self.ds.zero_optimization_stage() == 3
        self.ema = None
        if cfg.optim.ema_decay > 0:
            params = [p for p in model.parameters() if p.requires_grad]
            self.ema = EMA([p.ds_tensor if self.zero3 else p for p in params], cfg.optim.ema_decay)
            self._ema_params = params

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def step_count(self) -> int:
        return int(self.ds.global_steps)

    def autocast(self):
        return _autocast(self.cfg, torch.device(self.ds.device))

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # divides by grad_accum itself

    def step(self) -> dict | None:
        boundary = self.ds.is_gradient_accumulation_boundary()
        lr = lr_at(self.step_count, self.cfg.optim, self.cfg.train.steps)
        norm = None
        if boundary:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            if self.ds.zero_optimization_stage() == 0:  # DeepSpeed's stage-0 clip drops the norm it computes:
                norm = torch.nn.utils.get_total_norm(   # measure it here (the gradients are already all-reduced)
                    [p.grad for p in self.module.parameters() if p.grad is not None])
        self.ds.step()
        if not boundary:
            return None
        if self.ema is not None:
            self.ema.update()
        ds_norm = self.ds.get_global_grad_norm()
        return {"lr": lr, "grad_norm": ds_norm if ds_norm is not None else norm}

    # ---- state

    def _rank(self) -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def save_state(self, d: Path) -> None:
        """All ranks: DeepSpeed's files (model, ZeRO partitions of optimizer state) into `d`, plus the EMA."""
        d = Path(d)
        self.ds.save_checkpoint(str(d.parent), tag=d.name, client_state={"step": self.step_count},
                                save_latest=False)
        if self.ema is not None and (self.zero3 or self._rank() == 0):
            torch.save(self.ema.state_dict(), d / f"ema_rank{self._rank():05d}.pt")

    def load_state(self, d: Path) -> None:
        d = Path(d)
        path, _ = self.ds.load_checkpoint(str(d.parent), tag=d.name)
        if path is None:
            raise FileNotFoundError(f"{d}: DeepSpeed found no checkpoint to load")
        if self.ema is not None:
            f = d / f"ema_rank{self._rank() if self.zero3 else 0:05d}.pt"
            if f.is_file():
                self.ema.load_state_dict(torch.load(f, map_location="cpu", weights_only=False))

    @torch.no_grad()
    def full_state_dict(self, ema: bool = False) -> dict | None:
        """The consolidated fp32 state dict of the model (EMA weights with ema=True) on rank 0, None elsewhere.
        Under ZeRO-3 every rank must call it: parameters are gathered one at a time (peak memory one tensor)."""
        rank0 = self._rank() == 0
        use_ema = ema and self.ema is not None
        if not self.zero3:
            if not rank0:
                return None
            sd = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
            if use_ema:
                names = {id(p): n for n, p in self.module.named_parameters()}
                for p, s in zip(self._ema_params, self.ema.shadow):
                    sd[names[id(p)]] = s.cpu().clone()
                _fill_tied(self.module, sd)
            return sd
        import deepspeed

        shadow = {id(p): s for p, s in zip(self._ema_params, self.ema.shadow)} if use_ema else {}
        out, seen = {}, {}
        for k, v in self.module.state_dict(keep_vars=True).items():
            if not isinstance(v, torch.nn.Parameter):
                out[k] = v.detach().cpu().clone()
                continue
            if id(v) not in seen:
                swap = shadow.get(id(v))
                if swap is not None:                       # gather the EMA partition instead of the weights
                    keep = v.ds_tensor.data
                    v.ds_tensor.data = swap.to(keep.dtype)
                with deepspeed.zero.GatheredParameters([v]):
                    seen[id(v)] = v.detach().cpu().clone() if rank0 else None
                if swap is not None:
                    v.ds_tensor.data = keep
            out[k] = seen[id(v)]
        return out if rank0 else None


def cpu_compiler() -> str | None:
    """The C++ compiler torch inductor calls for CPU kernels (g++ unless `CXX` names another), or None if none is
    installed."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # inductor raises its own InvalidCxxCompiler (or an OSError) when the search fails
        return None


def compile_blocks(model: torch.nn.Module, device: torch.device) -> None:
    """dist.compile: torch.compile each transformer block (`model.layers`). On CPU inductor writes C++ kernels, so
    without a compiler this is a ConfigError naming the fix, not an inductor traceback at the first step. On 2 CPU
    cores it makes a demo step 1.18x faster (docs/drawing.md "Where a step's time goes")."""
    if device.type == "cpu" and cpu_compiler() is None:
        raise ConfigError("dist.compile=true on CPU needs a C++ compiler for torch inductor (g++, or the one `CXX` "
                          "names) and none was found: install one (e.g. apt-get install g++) or set "
                          "dist.compile=false")
    for blk in model.layers:
        blk.compile()


def build_engine(cfg: Config, model: torch.nn.Module):
    if cfg.dist.engine == "plain":
        return PlainEngine(cfg, model)
    return DeepSpeedEngine(cfg, model)


def init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed when needed -> (rank, world_size, device).

    Rank and world size come from the launcher's environment: torchrun and the deepspeed launcher set RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; under SLURM `srun` (one task per GPU) they are derived from
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID. A single `nextx train` gets rank 0 of 1 on a free local port.
    Backend: nccl on GPU, gloo on CPU. The plain engine never initialises anything (one process only)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cfg.dist.engine == "plain":
        if world > 1:
            raise ConfigError(f"dist.engine: 'plain' runs one process, the launcher started {world}; "
                              "use dist.engine=deepspeed")
        return rank, world, device
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if world == 1:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    return rank, world, device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
