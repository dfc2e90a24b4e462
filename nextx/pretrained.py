"""Pretrained weights and the model factory: a LOCAL Hugging Face Llama checkpoint -> NextX (`load_hf_llama`), and
`build_model`, the model a config describes (fresh, or its text path initialised from `model.hf_init`).

Core layer: training and inference both build their model here (inference never imports the trainer).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from nextx.config import Config, ConfigError, ModelConfig
from nextx.model import NextX

def _hf_rope(hc) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers config (v5 `rope_parameters` or v4 fields)."""
    rp = getattr(hc, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        theta, scaling = float(rp["rope_theta"]), rp
    else:
        theta, scaling = float(getattr(hc, "rope_theta", 10000.0)), getattr(hc, "rope_scaling", None)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if kind not in ("default", "llama3"):
        raise ValueError(f"RoPE scaling type {kind!r} is not implemented (supported: none/default, llama3)")
    return theta, (dict(scaling) if kind == "llama3" else None)


def _read_hf_state(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    sd = {}
    for f in files:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


_FROM_CHECKPOINT = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "ffn_multiple", "vocab_size",
                    "rope_theta", "norm_eps", "tie_embeddings", "hf_init")


def load_hf_llama(path, *, latent_dim: int = 16, latent_patch: int = 1, **overrides) -> NextX:
    """A LOCAL Hugging Face Llama checkpoint dir (config.json + safetensors or pytorch_model.bin) -> NextX in fp32.

    The ModelConfig comes from the checkpoint (d_model, n_layers, n_heads, n_kv_heads, ffn_hidden, rope_theta,
    norm_eps, tie_embeddings, vocab_size), then `overrides` (any ModelConfig field, e.g. vocab_size larger than the
    checkpoint's: the extra rows of the embedding / LM head keep their fresh N(0, init_std) init; pos2d; attention).
    Text-path weights are copied; latent/time/modulation parts stay freshly initialised. No network access.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint dir (no config.json)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type != "llama":
        raise ValueError(f"{path}: model_type is {model_type!r}, load_hf_llama reads only 'llama' checkpoints")
    from transformers import AutoConfig

    hc = AutoConfig.from_pretrained(str(path), local_files_only=True)
    d, nh = hc.hidden_size, hc.num_attention_heads
    if getattr(hc, "head_dim", None) not in (None, d // nh):
        raise ValueError(f"{path}: head_dim={hc.head_dim} != hidden_size/num_attention_heads={d // nh} (unsupported)")
    if getattr(hc, "attention_bias", False) or getattr(hc, "mlp_bias", False) or hc.hidden_act != "silu":
        raise ValueError(f"{path}: attention/mlp biases or hidden_act={hc.hidden_act!r} are not supported")
    theta, scaling = _hf_rope(hc)
    base = dict(d_model=d, n_layers=hc.num_hidden_layers, n_heads=nh,
                n_kv_heads=getattr(hc, "num_key_value_heads", None) or nh, ffn_hidden=hc.intermediate_size,
                vocab_size=hc.vocab_size, rope_theta=theta, norm_eps=hc.rms_norm_eps,
                tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)), hf_init=str(path))
    unknown = set(overrides) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown ModelConfig override(s): {sorted(unknown)}")
    cfg = ModelConfig(**{**base, **overrides})
    if cfg.vocab_size < hc.vocab_size:
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the checkpoint's {hc.vocab_size}")
    for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "rope_theta"):
        if getattr(cfg, k) != base[k]:
            raise ValueError(f"override {k}={getattr(cfg, k)} contradicts the checkpoint ({base[k]})")
    model = NextX(cfg, vocab_size=cfg.vocab_size, latent_dim=latent_dim, rope_scaling=scaling,
                  latent_patch=latent_patch)

    sd = {k.removeprefix("model."): v for k, v in _read_hf_state(path).items()}
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]          # tied checkpoints store only the embedding
    ours = dict(model.named_parameters(remove_duplicate=False))
    names = ["embed_tokens.weight", "norm.weight", "lm_head.weight"]
    for i in range(cfg.n_layers):
        names += [f"layers.{i}.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    missing = [n for n in names if n not in sd]
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for n in names:
            if n == "lm_head.weight" and cfg.tie_embeddings:
                continue                                           # shares embed_tokens.weight
            src, dst = sd[n], ours[n]
            dst[: src.shape[0]].copy_(src.to(dst.dtype))           # rows beyond the checkpoint's vocab stay fresh
    return model


def build_model(cfg: Config, text_tok, image_tok):
    """The model for this config: fresh, or text path initialised from a local HF Llama (model.hf_init)."""
    vocab = cfg.model.vocab_size or text_tok.vocab_size
    if vocab < text_tok.vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the text tokenizer's {text_tok.vocab_size}")
    patch = image_tok.patch_size if getattr(image_tok, "type", None) == "pixel" else 1   # pixels per token side
    if cfg.model.hf_init:   # the checkpoint sets the text path's shape; every other model field is the config's
        hf_vocab = json.loads((Path(cfg.model.hf_init) / "config.json").read_text()).get("vocab_size", 0)
        ours = {f.name: getattr(cfg.model, f.name) for f in fields(ModelConfig) if f.name not in _FROM_CHECKPOINT}
        return load_hf_llama(cfg.model.hf_init, vocab_size=max(vocab, hf_vocab), latent_dim=image_tok.token_dim,
                             latent_patch=patch, **ours)
    return NextX(cfg.model, vocab_size=vocab, latent_dim=image_tok.token_dim, latent_patch=patch)
