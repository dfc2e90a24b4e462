"""Typed configuration: nested dataclasses <- YAML <- dotlist overrides.

    cfg = load_config("configs/tiny.yaml", ["model.n_layers=2", "optim.lr=1e-3"])

Every field has a default and a comment; a YAML file or an override may set only fields that exist.
An unknown key, a value of the wrong type, a value outside its allowed set, or an impossible combination
raises `ConfigError` naming the key and what is allowed, before any work starts. Checks that involve one
section live in that section's `check()`; checks across sections live in `Config.check()`.

Types understood: bool, int, float, str, Literal[...] (choices), tuple[T, ...], list[T], nested dataclasses.
Floats accept ints and strings such as "3e-4" (PyYAML reads `3e-4` without a dot as a string).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nextx import imm
from nextx.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig:
    d_model: int = 256            # residual width
    n_layers: int = 4             # transformer blocks
    n_heads: int = 4              # query heads
    n_kv_heads: int = 4           # key/value heads (GQA); must divide n_heads
    ffn_hidden: int = 0           # SwiGLU hidden width; 0 -> Llama rule (8/3 d_model, rounded up to ffn_multiple)
    ffn_multiple: int = 64        # rounding of the derived SwiGLU width
    vocab_size: int = 0           # 0 -> taken from the text tokenizer at build time
    rope_theta: float = 10000.0   # RoPE base of the 1D sequence positions
    norm_eps: float = 1e-5        # RMSNorm epsilon
    time_freq_dim: int = 256      # sinusoidal features of t and of t - s (fp32), each into its own MLP
    pos2d: Literal["rope", "sincos", "rope+sincos", "none"] = "rope"  # 2D position inside an image (docs/design.md §3)
    rope2d_freqs: Literal["own", "shared"] = "own"  # row/col RoPE pairs: their own ladder 2^-j per axis (both axes
    #   alike, wavelengths 6.3 cells and up), or "shared": the 1D ladder's frequencies at those pairs (columns ~3x
    #   coarser than rows, about one useful pair per axis over an 8x8 grid; the layout before 2026-11-29)
    latent_conv: int = 1          # kernel of the latent embedding and latent head over each image's token grid: 1 =
    #   linear per token; 3 = 3x3 convolutions, so every token's input and output see its neighbours from the start
    block_conv: int = 0           # 0 = off; k = a zero-initialised depthwise k x k convolution over each image split's
    #   grid in every block (after attention), so locality does not wait for attention to learn it
    pixel_unet: int = 0           # 0 = off; W = a pixel-level U-Net encoder/decoder around each image's tokens:
    #   every token's latent unfolded to its p x p pixels (p = the pixel tokenizer's patch, 1 for autoencoder
    #   latents), convolutions of W, 2W, ... channels down to the token grid (added to the latent embedding), and up
    #   again with skips to the noise tokens' output (added to the latent head): drawing is translation-equivariant
    #   in pixels, not learned per sub-patch offset (Transfusion's U-Net down/up blocks, shrunk)
    text_cond: Literal["none", "pooled"] = "none"  # pooled: the mean input embedding of the text before each image
    #   in its document (its caption) goes through an MLP into the time embedding, so every noise token's adaLN
    #   modulation carries the caption from the first step, not only what attention has learned to fetch
    sincos_scale: float = 0.0     # amplitude of the fixed 2D sin-cos table added to latent embeddings (0 -> init_std)
    attention: Literal["sdpa", "flex", "xformers"] = "sdpa"  # sdpa: dense bool mask (CPU, reference)
    activation_checkpointing: bool = False
    init_std: float = 0.02        # normal init of linear layers and embeddings
    tie_embeddings: bool = False  # share token embedding and LM head
    hf_init: str = ""             # local Hugging Face Llama checkpoint dir that initialises the text path

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def check(self, p: str = "model") -> None:
        for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "time_freq_dim", "ffn_multiple"):
            _require(getattr(self, k) > 0, f"{p}.{k}", f"must be > 0, got {getattr(self, k)}")
        _require(self.d_model % self.n_heads == 0, f"{p}.d_model",
                 f"{self.d_model} is not divisible by n_heads={self.n_heads}")
        _require(self.n_heads % self.n_kv_heads == 0, f"{p}.n_kv_heads",
                 f"{self.n_kv_heads} must divide n_heads={self.n_heads}")
        _require(self.head_dim % 4 == 0, f"{p}.n_heads",
                 f"head_dim = d_model/n_heads = {self.head_dim} must be a multiple of 4 (RoPE halves, 2D sections)")
        _require(self.ffn_hidden >= 0 and self.vocab_size >= 0, f"{p}.ffn_hidden/vocab_size", "must be >= 0")
        _require(self.time_freq_dim % 2 == 0, f"{p}.time_freq_dim", "must be even (sin and cos halves)")
        _require(self.latent_conv >= 1 and self.latent_conv % 2 == 1, f"{p}.latent_conv",
                 f"must be an odd kernel size >= 1 (1 = linear), got {self.latent_conv}")
        _require(self.pixel_unet >= 0, f"{p}.pixel_unet", f"must be 0 (off) or a width > 0, got {self.pixel_unet}")
        _require(self.block_conv == 0 or (self.block_conv > 0 and self.block_conv % 2 == 1), f"{p}.block_conv",
                 f"must be 0 (off) or an odd kernel size, got {self.block_conv}")


@dataclass
class DataConfig:
    train_shards: str = ""        # shard dir, a .tar, or a brace pattern (data/shapes32/train-{000000..000009}.tar)
    train_split: str = "train"    # split prefix inside a shard dir
    val_shards: str = ""          # held-out shards for quick eval ("" = none)
    val_split: str = "heldout"
    text_tokenizer: str = ""      # dir from `nextx tokenizer text`, a SentencePiece .model, or a HF tokenizer dir
    image_tokenizer: str = ""     # dir from `nextx tokenizer pixel` or `nextx tokenizer image`
    row_len: int = 512            # tokens per packed row
    batch_rows: int = 8           # packed rows per micro-batch per rank
    t2i_ratio: float = 0.5        # share of caption+image pairs laid out caption->image (rest: image->caption)
    drop_trailing_clean: bool = True  # no clean split for a generated image that ends its document
    noise_copies: int = 1         # noise splits per generated image (objective.grouping=copies: the M particles)
    image_pos_jitter: int = 0     # training: a gap of U{0..J} 1D positions before each image's <boi>
    #   (`sequence.layout_document(image_gaps=)`): the caption is read by what it says, not where it sits (docs/drawing.md)
    caption_cut: float = 0.0      # training: the share of caption->image documents whose caption is cut to its
    #   first 1..n-1 words (`data.cut_caption`): prompts that say less than the captions (no place) stay in distribution
    max_text_tokens: int = 128    # longer text segments are truncated (counted and logged)
    trim_pads: bool = False       # cut each batch to its longest row (sequence.trim_pads): fewer tokens when rows hold
                                  # one short document; L then varies by batch (CPU; flex kernels want one L)
    trim_multiple: int = 8        # trim_pads rounds L up to a multiple of this (fewer distinct shapes to compile)
    shuffle_buffer: int = 512     # documents in the in-memory shuffle buffer (0 = no shuffle)
    shard_shuffle: bool = True    # shuffle shard order each epoch
    resample: bool = True         # infinite stream: shards drawn with replacement (multi-node friendly)
    num_workers: int = 2          # DataLoader workers per rank
    pack_buffer: int = 64         # documents held while packing rows (larger = fewer pad tokens)
    use_latents: Literal["auto", "pixels", "latents"] = "auto"  # pre-encoded latents when present
    cache_docs: bool = False      # each reader keeps the documents it decoded and tokenized in memory; later epochs
                                  # skip the tar, the image decoding and the tokenizers (shard sets that fit in RAM)
    seed: int = 0
    max_bad_samples: int = 1000   # a reader that meets more bad samples than this stops the run, naming the shards
    max_bad_fraction: float = 0.2  # ... or a larger share of bad samples, once 50 samples were read

    def check(self, p: str = "data") -> None:
        _require(0.0 <= self.t2i_ratio <= 1.0, f"{p}.t2i_ratio", f"must be in [0, 1], got {self.t2i_ratio}")
        for k in ("row_len", "batch_rows", "max_text_tokens", "pack_buffer", "trim_multiple"):
            _require(getattr(self, k) > 0, f"{p}.{k}", f"must be > 0, got {getattr(self, k)}")
        for k in ("shuffle_buffer", "num_workers"):
            _require(getattr(self, k) >= 0, f"{p}.{k}", f"must be >= 0, got {getattr(self, k)}")
        _require(self.noise_copies >= 1, f"{p}.noise_copies", f"must be >= 1, got {self.noise_copies}")
        _require(0.0 <= self.caption_cut <= 1.0, f"{p}.caption_cut", f"must be in [0, 1], got {self.caption_cut}")
        _require(self.image_pos_jitter >= 0, f"{p}.image_pos_jitter", f"must be >= 0, got {self.image_pos_jitter}")
        _require(self.max_bad_samples >= 0 and 0 <= self.max_bad_fraction <= 1, f"{p}.max_bad_samples/fraction",
                 f"must be >= 0 and in [0, 1], got {self.max_bad_samples} and {self.max_bad_fraction}")
        _require(self.max_text_tokens < self.row_len, f"{p}.max_text_tokens",
                 f"{self.max_text_tokens} must be < row_len={self.row_len}")


@dataclass
class ObjectiveConfig:
    kind: Literal["imm", "flow"] = "imm"  # flow = flow-matching baseline on the same model
    text_weight: float = 1.0     # lambda_text on the per-target-normalised CE
    image_weight: float = 1.0    # lambda_image on the IMM (or flow) loss
    sigma_d: float = imm.SIGMA_D  # data std of the latents, 0.5 (docs/imm.md §1)
    T: float = imm.T_MAX         # largest time (OT-FM), 0.994: eta_max ~ 165.7
    eps: float = 0.0             # smallest time (0 for latents, 0.006 for pixels in the paper)
    k: int = 12                  # r(s,t): eta_r = eta_t - (eta_max - eta_min) / 2^k
    k_start: float = 0.0         # k curriculum: k rises linearly from k_start to k over k_ramp_steps (README)
    k_ramp_steps: int = 0        # 0 = fixed k (the paper)
    min_gap: float = 1e-4        # r <= t - min_gap (docs/imm.md §2)
    group_size: int = 4          # M: consecutive images sharing (s, r, t) (grouping=images)
    partial_group: Literal["equal", "size"] = "equal"  # weight of the last, smaller group of a batch (grouping=
    #   images): "equal" = like a full group (the reference's mean over groups), "size" = by its particle count
    grouping: Literal["images", "copies"] = "images"  # IMM particles: M consecutive images of the batch (the
    #   reference recipe), or the data.noise_copies noise splits of ONE image sharing its caption (see README)
    a: float = 1.0               # weight w(s,t) exponent of alpha_t
    b: float = 4.0               # weight w(s,t) sigmoid shift
    time_sampling: Literal["uniform", "lognormal"] = "uniform"  # paper: t ~ U(eps,T), s|t ~ U(eps,t)
    t_shift: float = 1.0         # SD3 time shift of the uniform t draw (`imm.shift_time`): > 1 trains more near noise,
    #   where a scene's layout is decided (3: half the draws above t = 0.75); 1 = the paper's uniform t
    s_eps_share: float = 0.0     # share of the IMM draws whose s is eps (`imm.sample_t_s`): the clean-estimate jump,
    #   the only s the restart sampler asks for; 0 = the paper's s | t ~ U(eps, t)
    imm_sampler: Literal["pushforward", "restart"] = "pushforward"  # an IMM run's default sampler (`nextx t2i`,
    #   evals, sample grids; a flow run samples with Euler): restart re-noises each step's clean estimate
    #   (docs/drawing.md). Every run's sampling grid is shifted by its t_shift (`imm.sampling_times`)
    cfg_drop: float = 0.1        # probability of replacing a document's text condition by the null prompt
    null_prompt: Literal["hidden", "pad"] = "hidden"  # the null prompt (`objective.null_prompt`): "hidden" takes
    #   the caption out of the sequence, so its length cannot leak the count; "pad" replaces its ids by <pad> in place

    def check(self, p: str = "objective") -> None:
        _require(0.0 <= self.eps < self.T < 1.0, f"{p}.eps/T", f"need 0 <= eps < T < 1, got eps={self.eps}, T={self.T}")
        _require(self.sigma_d > 0, f"{p}.sigma_d", "must be > 0")
        _require(1 <= self.k <= 30, f"{p}.k", f"must be in [1, 30], got {self.k}")
        _require(0 <= self.k_start <= self.k, f"{p}.k_start", f"must be in [0, k={self.k}], got {self.k_start}")
        _require(self.k_ramp_steps >= 0, f"{p}.k_ramp_steps", "must be >= 0")
        _require(self.min_gap >= 0, f"{p}.min_gap", "must be >= 0")
        _require(self.group_size >= 1, f"{p}.group_size", "must be >= 1")
        _require(0.0 <= self.cfg_drop < 1.0, f"{p}.cfg_drop", "must be in [0, 1)")
        _require(self.t_shift > 0, f"{p}.t_shift", f"must be > 0 (1 = no shift), got {self.t_shift}")
        _require(0.0 <= self.s_eps_share <= 1.0, f"{p}.s_eps_share", f"must be in [0, 1], got {self.s_eps_share}")
        _require(self.s_eps_share < 1.0 or self.kind == "flow" or self.imm_sampler == "restart", f"{p}.s_eps_share",
                 "1 trains at s = eps alone, which only the restart sampler asks for: set objective.imm_sampler=restart")
        _require(self.t_shift == 1.0 or self.time_sampling == "uniform", f"{p}.t_shift",
                 "applies to time_sampling=uniform only")
        _require(self.text_weight >= 0 and self.image_weight >= 0, f"{p}.text_weight/image_weight", "must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 3e-4              # peak learning rate
    min_lr_ratio: float = 0.1     # cosine floor as a fraction of lr
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1     # on matrices (dim >= 2) except embeddings; none on norms and biases
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0        # max global grad norm (0 = off)
    ema_decay: float = 0.0        # EMA of weights for export (0 = off)

    def check(self, p: str = "optim") -> None:
        _require(self.lr > 0, f"{p}.lr", "must be > 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"{p}.min_lr_ratio", "must be in [0, 1]")
        _require(self.warmup_steps >= 0 and self.grad_clip >= 0, f"{p}.warmup_steps/grad_clip", "must be >= 0")
        _require(all(0.0 <= b < 1.0 for b in self.betas), f"{p}.betas", f"each must be in [0, 1), got {self.betas}")
        _require(0.0 <= self.ema_decay < 1.0, f"{p}.ema_decay", "must be in [0, 1)")


@dataclass
class DistConfig:
    engine: Literal["deepspeed", "plain"] = "deepspeed"  # plain: single-process torch loop (debugging)
    zero_stage: int = 2           # DeepSpeed ZeRO stage 0-3
    precision: Literal["bf16", "fp32"] = "bf16"
    grad_accum: int = 1           # micro-batches per optimizer step
    offload_optimizer: bool = False  # ZeRO CPU offload of optimizer states
    deepspeed_json: str = ""      # raw DeepSpeed JSON whose keys override the derived config (advanced)
    compile: bool = False         # torch.compile each transformer block (ZeRO 0-2; on CPU needs a C++ compiler)

    def check(self, p: str = "dist") -> None:
        _require(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.grad_accum >= 1, f"{p}.grad_accum", "must be >= 1")
        _require(not (self.offload_optimizer and self.zero_stage == 0), f"{p}.offload_optimizer",
                 "needs zero_stage >= 1")
        _require(not (self.engine == "plain" and self.zero_stage > 0), f"{p}.engine",
                 "'plain' has no ZeRO: set dist.zero_stage=0 or dist.engine=deepspeed")
        _require(not (self.compile and self.zero_stage == 3), f"{p}.compile",
                 "compiled blocks are not supported with ZeRO-3 (its parameter hooks); use zero_stage <= 2")


@dataclass
class TrainConfig:
    steps: int = 1000             # optimizer steps
    log_every: int = 10
    save_every: int = 500         # checkpoint interval in steps (0 = only at the end)
    sample_every: int = 0         # sample grids interval (0 = off)
    eval_every: int = 0           # quick eval interval (0 = off)
    report_every: int = 0         # the `nextx eval report` section of this model (exact scores at IMM 1/2/4/8 or
                                  # flow 8/25/50 steps, captions, perplexity) on report_prompts held-out shapes
                                  # prompts of data.val_shards -> RUN/reports/step_N/ and metrics (0 = off)
    report_prompts: int = 32
    seed: int = 0
    threads: int = 0              # torch CPU threads (0 = torch default)
    resume: Literal["auto", "never", "must"] = "auto"  # auto: continue from checkpoints/latest of the run dir
                                  # when its config matches (model, data, objective, optim, dist, seed); never:
                                  # never resume; must: fail if nothing to resume
    if_exists: Literal["refuse", "new_run", "overwrite"] = "refuse"  # the run dir holds a run this one does not
                                  # continue (another config, or resume=never): refuse naming the difference,
                                  # write NAME-2 (NAME-3, ...) instead, or delete the old run's outputs first
    keep_checkpoints: int = 0     # keep only the newest N checkpoints (0 = keep all)
    max_nonfinite: int = 5        # a NaN/inf loss skips its micro-batch (counted); this many in a row stop the run
                                  # naming the step and the last good checkpoint (0 = no check: no host sync)
    export_on_save: bool = False  # also write exports/step_N/ (safetensors) at every save, not only at the end
    init_from: str = ""           # a run dir, export or checkpoint whose model weights start this run (fine-tune, the
                                  # next phase of a curriculum): fresh optimizer, schedule, step and data; ignored on a
                                  # resume (the checkpoint holds everything). Model sections and tokenizers must match
    eval_batches: int = 4         # val batches per rank in the quick eval (train.eval_every)
    sample_prompts: int = 4       # fixed val captions (and images) in the sample grids (train.sample_every)
    peak_tflops: float = 0.0      # per-device peak for MFU (0 = from the GPU name: bf16 dense; n/a on CPU)

    def check(self, p: str = "train") -> None:
        _require(self.steps > 0 and self.log_every > 0, f"{p}.steps/log_every", "must be > 0")
        for k in ("save_every", "sample_every", "eval_every", "report_every", "threads", "keep_checkpoints",
                  "peak_tflops", "max_nonfinite"):
            _require(getattr(self, k) >= 0, f"{p}.{k}", "must be >= 0")
        _require(self.eval_batches > 0 and self.sample_prompts > 0 and self.report_prompts > 0,
                 f"{p}.eval_batches/sample_prompts/report_prompts", "must be > 0")


@dataclass
class Config:
    name: str = "run"             # run directory name under run_dir
    run_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> "Config":
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.check(f.name)
        _require((self.objective.grouping == "copies") == (self.data.noise_copies > 1), "objective.grouping",
                 f"'{self.objective.grouping}' with data.noise_copies={self.data.noise_copies}: grouping=copies needs "
                 "data.noise_copies >= 2 (the particles), grouping=images needs data.noise_copies=1")
        _require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
                 f"must be a plain directory name (non-empty, no '/', not . or ..), got {self.name!r}")
        _require(self.objective.text_weight > 0 or self.data.t2i_ratio == 1.0, "objective.text_weight",
                 "is 0 but data.t2i_ratio < 1 lays out captioning pairs whose only loss is text")
        _require(not self.train.report_every or bool(self.data.val_shards), "train.report_every",
                 "needs data.val_shards (held-out shapes shards) for its prompts")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / self.name


# --------------------------------------------------------------------------------------------------------
# Building a dataclass from plain data, strictly


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/override value to the field type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):  # override "a.b=[1,2]" arrives parsed; a bare string is a mistake
            raise ConfigError(f"{key}: expected a list, got the string {value!r}")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # "name=123" is a fine run name
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key at {where}; "
                          f"allowed: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Config -> plain nested dict (tuples become lists), the inverse of building from YAML."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"{dotted}: {p!r} is not a config section")
        node = node[p]
    if parts[-1] not in node:
        section = ".".join(parts[:-1]) or "top level"
        raise ConfigError(f"{dotted}: unknown key in {section}; allowed: {', '.join(node)}")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001-or-'1e-3'); the value is parsed as YAML, then typed by the field."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        return key, (yaml.safe_load(raw) if raw.strip() else "")
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: its value is not valid YAML ({getattr(e, 'problem', e)})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (optional) <- dotlist overrides; checked. Raises ConfigError on any problem."""
    tree = to_dict(Config())
    if path is not None:
        p = Path(path)
        builtin = Path(__file__).resolve().parents[1] / p   # configs/*.yaml of the clone, from any directory
        if not p.is_file() and not p.is_absolute() and builtin.is_file():
            p = builtin
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{p}: YAML syntax error{where}: {problem}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        _merge(tree, loaded, "")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    return cfg.check()


def _merge(base: dict, new: dict, prefix: str) -> None:
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in base:
            section = prefix.rstrip(".") or "top level"
            raise ConfigError(f"{key}: unknown key in {section}; allowed: {', '.join(base)}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: is a section; expected a mapping, got {v!r}")
            _merge(base[k], v, key + ".")
        else:
            base[k] = v


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (run dir, checkpoints); `load_config` reads it back identically."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
