"""Training metrics: FLOPs per token and MFU, memory, per-step accumulators, the all-reduced log record, and the
writers (metrics.jsonl + TensorBoard). Used by the training loop (`nextx/train.py`) and the benchmarks.

Accumulators hold host numbers only: counts come from the CPU batch before the copy, losses from the parts the
objective returns, so nothing here reads a device value between log steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nextx import imm
from nextx.config import Config
from nextx.sequence import NOISE, PAD

# Dense bf16 tensor-core peaks per device, TFLOP/s (vendor datasheets; the "PCIe" entries are checked first).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0,
               "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "RTX 4090": 165.0, "RTX 3090": 71.0}
LOSS_KEYS = ("loss", "ce", "imm", "flow")            # averaged over micro-batches and ranks
COUNT_KEYS = ("text_targets", "images", "cfg_dropped", "groups")  # summed


PER_IMAGE_PARAMS = ("time_mlp.", "gap_mlp.", ".ada.", "final_ada.")  # run once per image, not per token


def token_flops(model, seq_len: int) -> float:
    """Training FLOPs per token (fwd + bwd): model.flops_per_token minus the parameters that run once per image
    (time MLPs and adaLN projections: n_img x D inputs, negligible), which 6N would count per token."""
    per_image = sum(p.numel() for n, p in model.named_parameters() if any(k in f".{n}" for k in PER_IMAGE_PARAMS))
    return model.flops_per_token(seq_len) - 6.0 * per_image


def peak_flops(cfg: Config, device: torch.device) -> float | None:
    """Per-device peak FLOP/s for MFU: train.peak_tflops, else the table by GPU name; None on CPU/unknown."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def memory_gb(device: torch.device) -> float:
    """Peak memory since the last call: CUDA allocated on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        m = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return m
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def all_reduce_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over ranks (float64 on CPU in the caller; moved to the device for nccl)."""
    if world == 1:
        return x
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else x.device
    y = x.to(dev)
    torch.distributed.all_reduce(y)
    return y.cpu()


class Metrics:
    """metrics.jsonl + TensorBoard (rank 0); a null object elsewhere."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.file = (out / "metrics.jsonl").open("a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def fmt_record(rec: dict) -> str:
    def f(k, v):
        if isinstance(v, float):
            return f"{k} {v:.4g}"
        return f"{k} {v}"
    return " | ".join(f(k, v) for k, v in rec.items())


def new_accumulator() -> dict:
    return {"loss_sums": dict.fromkeys(LOSS_KEYS, 0.0), "counts": dict.fromkeys(COUNT_KEYS, 0), "micro": 0,
            "tokens": 0, "tokens_all": 0, "pad": 0, "images": 0, "flops": 0.0, "stats": {},
            "nonfinite": 0}


def count_batch(acc: dict, batch, flops_tok: float) -> None:
    """Token, image and FLOP counts of a micro-batch, from the CPU batch (no device sync). The IMM target pass is
    one extra forward (1/3 of fwd+bwd) on the rows holding noise tokens."""
    kind = batch.kind
    B, L = kind.shape
    n_pad = int((kind == PAD).sum())
    target_rows = int((kind == NOISE).any(dim=1).sum())
    acc["tokens_all"] += B * L
    acc["tokens"] += B * L - n_pad
    acc["pad"] += n_pad
    acc["images"] += int(batch.image_generate.sum())
    acc["flops"] += flops_tok * B * L + flops_tok / 3 * target_rows * L
    for k, v in batch.stats.items():
        if isinstance(v, (int, float)):
            acc["stats"][k] = acc["stats"].get(k, 0) + v


def log_record(acc, info, step, dt, elapsed, world, peak, device, cfg, timed_out) -> tuple[dict, bool]:
    """The log dict: global means of the loss parts, sums of the counts, rates, MFU, memory. One all-reduce."""
    stat_keys = sorted(acc["stats"])
    vals = ([acc["loss_sums"][k] for k in LOSS_KEYS] + [acc["counts"][k] for k in COUNT_KEYS]
            + [acc["micro"], acc["tokens"], acc["tokens_all"], acc["pad"], acc["images"], acc["flops"],
               acc["nonfinite"], float(timed_out)])
    red = all_reduce_sum(torch.tensor([float(v) for v in vals], dtype=torch.float64), world).tolist()  # host sync
    nl, nc = len(LOSS_KEYS), len(COUNT_KEYS)
    micro, tokens, tokens_all, pad, images, flops, nonfinite, tflag = red[nl + nc:]
    rec: dict = {"step": step}
    for k, v in zip(LOSS_KEYS, red[:nl]):
        if k in ("loss", "ce", cfg.objective.kind):
            rec[k] = v / max(1.0, micro)
    gn = info.get("grad_norm")
    rec["lr"] = info["lr"]
    if cfg.objective.kind == "imm" and cfg.objective.k_ramp_steps:
        o = cfg.objective
        rec["k"] = imm.k_at(step - 1, o.k, o.k_start, o.k_ramp_steps)  # the k of this step's last update
    rec["grad_norm"] = float(gn) if gn is not None else float("nan")
    rec["tokens_per_s"] = tokens / dt
    rec["images_per_s"] = images / dt
    rec["mfu"] = flops / dt / (peak * world) if peak else "n/a"
    rec["mem_gb"] = memory_gb(device)
    rec["packing"] = 1 - pad / max(1.0, tokens_all)
    for k, v in zip(COUNT_KEYS, red[nl:nl + nc]):
        rec[k] = int(v)
    if nonfinite:
        rec["nonfinite_skipped"] = int(nonfinite)  # micro-batches whose loss was NaN/inf: no backward, no update
    for k in stat_keys:  # this rank's pipeline counters (bad samples, truncations)
        rec[f"data_{k}"] = acc["stats"][k]
    rec["elapsed_s"] = elapsed
    return rec, tflag > 0
