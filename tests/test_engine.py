"""Engine pieces: the derived DeepSpeed config, JSON overrides, lr schedule, EMA, ZeRO-3 gathers (in-process)."""

import json
import math

import pytest
import torch

from nextx.config import ConfigError, load_config
from nextx.engine import (EMA, _DSNet, deep_merge, deepspeed_config, lr_at, resolved_deepspeed_config)


def _cfg(*over):
    return load_config(None, list(over))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_deepspeed_config_from_typed_config(stage, precision):
    cfg = _cfg(f"dist.zero_stage={stage}", f"dist.precision={precision}", "dist.grad_accum=4",
               "data.batch_rows=3", "optim.grad_clip=0.5")
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert "train_batch_size" not in ds  # DeepSpeed derives it with the world size
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}  # bf16 = autocast, fp32 weights
    assert ds["zero_allow_untested_optimizer"] and "optimizer" not in ds and "scheduler" not in ds
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    assert deepspeed_config(cfg) == ds  # pure
    json.dumps(ds)  # serialisable as DeepSpeed expects


def test_deepspeed_config_offload_and_clip_off():
    ds = deepspeed_config(_cfg("dist.zero_stage=2", "dist.offload_optimizer=true", "optim.grad_clip=0"))
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # keep torch AdamW on the CPU states (no JIT-built Adam)
    assert ds["gradient_clipping"] == 0.0


def test_deep_merge_overrides_leaves_and_keeps_siblings():
    base = {"a": 1, "z": {"stage": 2, "x": {"p": 1, "q": 2}}}
    out = deep_merge(base, {"z": {"x": {"q": 5}, "new": True}, "b": [1]})
    assert out == {"a": 1, "b": [1], "z": {"stage": 2, "x": {"p": 1, "q": 5}, "new": True}}
    assert base["z"]["x"]["q"] == 2  # inputs untouched


def test_deepspeed_json_override(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": True},
                             "communication_data_type": "bf16", "gradient_accumulation_steps": 2}))
    cfg = _cfg("dist.zero_stage=2", "dist.grad_accum=2", f"dist.deepspeed_json={f}")
    ds = resolved_deepspeed_config(cfg)
    assert ds["zero_optimization"] == {**deepspeed_config(cfg)["zero_optimization"], "reduce_bucket_size": 1000,
                                       "overlap_comm": True}
    assert ds["communication_data_type"] == "bf16"


@pytest.mark.parametrize("payload, match", [
    ({"optimizer": {"type": "AdamW"}}, "optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"train_micro_batch_size_per_gpu": 7}, "data.batch_rows"),
    ([1, 2], "JSON object"),
])
def test_deepspeed_json_refuses_what_the_loop_owns(tmp_path, payload, match):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match=match):
        resolved_deepspeed_config(_cfg(f"dist.deepspeed_json={f}"))


def test_deepspeed_json_missing_file():
    with pytest.raises(ConfigError, match="dist.deepspeed_json"):
        resolved_deepspeed_config(_cfg("dist.deepspeed_json=/nonexistent/ds.json"))


def test_config_checks_of_the_trainer_fields():
    with pytest.raises(ConfigError, match="dist.compile"):
        _cfg("dist.zero_stage=3", "dist.compile=true")
    with pytest.raises(ConfigError, match="train.resume"):
        _cfg("train.resume=sometimes")
    with pytest.raises(ConfigError, match="offload_optimizer"):
        _cfg("dist.zero_stage=0", "dist.offload_optimizer=true")


def test_lr_schedule():
    o = _cfg("optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1").optim
    assert [lr_at(s, o, 110) for s in (0, 9)] == pytest.approx([0.1, 1.0])
    assert lr_at(60, o, 110) == pytest.approx(0.55) and lr_at(110, o, 110) == pytest.approx(0.1)
    assert lr_at(500, o, 110) == pytest.approx(0.1)  # past the end: stays at the floor
    lrs = [lr_at(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # cosine decays monotonically
    assert lr_at(35, o, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    c = _cfg("optim.lr=2.0", "optim.warmup_steps=4", "optim.schedule=constant").optim
    assert [lr_at(s, c, 100) for s in (0, 3, 4, 99)] == pytest.approx([0.5, 2.0, 2.0, 2.0])
    z = _cfg("optim.lr=1.0", "optim.warmup_steps=0").optim
    assert lr_at(0, z, 10) == pytest.approx(1.0)


def test_ema_update_is_the_exponential_average():
    w = [torch.zeros(3), torch.ones(2)]
    ema = EMA(w, decay=0.9)
    w[0].fill_(1.0)
    ema.update()
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 0.9 ** 2))  # from 0 towards 1
    assert torch.allclose(ema.shadow[1], torch.ones(2))
    sd = ema.state_dict()
    ema2 = EMA([torch.zeros(3), torch.zeros(2)], decay=0.9)
    ema2.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, ema2.shadow))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4, bias=False)
        self.register_buffer("freq", torch.arange(3.0))


def test_dsnet_output_is_a_dict_with_attributes():
    from nextx.model import ModelOutput

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return ModelOutput(text_logits=x[:0] * self.w, latent_out=x * self.w)

    out = _DSNet(M(), uniform=True)(torch.ones(3, 2))
    assert isinstance(out, dict) and out.latent_out is out["latent_out"] and out.past is None
    out.latent_out.sum().backward()  # the empty logits are in the graph: every parameter gets a gradient


@pytest.mark.parametrize("stage", [3, 2])
def test_full_state_dict_gathers_weights_and_ema(stage, tmp_path, monkeypatch):
    """In-process DeepSpeed (1 rank): the consolidated state dict, and the EMA gathered through the partitions."""
    from nextx.engine import DeepSpeedEngine, _free_port, init_distributed

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # what init_distributed would set, undone after the test
    cfg = _cfg("dist.engine=deepspeed", f"dist.zero_stage={stage}", "dist.precision=fp32", "optim.ema_decay=0.5",
               f"run_dir={tmp_path}")
    init_distributed(cfg)
    torch.manual_seed(0)
    model = _Tiny()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    eng = DeepSpeedEngine(cfg, model)
    assert eng.zero3 == (stage == 3)
    for s in eng.ema.shadow:
        s.mul_(2.0)  # EMA := 2 x weights, to tell them apart
    sd, ema = eng.full_state_dict(), eng.full_state_dict(ema=True)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert torch.equal(ema["freq"], ref["freq"])
    for k in ("a.weight", "a.bias", "b.weight"):
        assert torch.equal(ema[k], 2 * ref[k])
    again = eng.full_state_dict()
    assert all(torch.equal(again[k], ref[k]) for k in ref)  # the swap was undone


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_step_reports_the_gradient_norm(stage, tmp_path, monkeypatch):
    """engine.step()'s grad_norm is the global norm before clipping at every ZeRO stage (DeepSpeed's stage-0 clip
    computes it and drops it: the engine measures it itself there), equal to the norm of an autograd copy."""
    from nextx.engine import DeepSpeedEngine, _free_port, init_distributed

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = _cfg("dist.engine=deepspeed", f"dist.zero_stage={stage}", "dist.precision=fp32", "optim.grad_clip=0.01",
               f"run_dir={tmp_path}")
    init_distributed(cfg)
    torch.manual_seed(0)
    model, x = _Tiny(), torch.randn(5, 8)
    copy = _Tiny()
    copy.load_state_dict(model.state_dict())
    copy.b(copy.a(x)).square().sum().backward()
    want = torch.cat([p.grad.flatten() for p in copy.parameters()]).norm()
    eng = DeepSpeedEngine(cfg, model)
    eng.backward(model.b(model.a(x)).square().sum())
    info = eng.step()
    assert float(info["grad_norm"]) == pytest.approx(float(want), rel=1e-5) and float(want) > 0.01  # clipped step
