"""Typed configs: every YAML in configs/ loads; overrides; every kind of bad input fails with the key named."""

from pathlib import Path

import pytest

from nextx.config import Config, ConfigError, load_config, save_config, to_dict

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"tiny", "small", "base"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_yaml_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.name == path.stem
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(cfg)


def test_overrides_and_types(tmp_path):
    cfg = load_config(CONFIGS[0], ["model.n_layers=2", "optim.lr=3e-4", "optim.betas=[0.9, 0.99]",
                                   "objective.kind=flow", "dist.precision=fp32", "name=123"])
    assert cfg.model.n_layers == 2 and cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == (0.9, 0.99)
    assert cfg.objective.kind == "flow" and cfg.name == "123"
    # YAML's '3e-4' (no dot) is a string to PyYAML; a float field still takes it
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 3e-4\n")
    assert load_config(p).optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("overrides, match", [
    (["model.n_layer=2"], r"model\.n_layer: unknown key in model; allowed: d_model"),
    (["nope=1"], r"nope: unknown key in top level"),
    (["model.d_model.x=1"], r"'d_model' is not a config section"),
    (["optim.lr=fast"], r"optim\.lr: expected a number"),
    (["model.n_layers=2.5"], r"model\.n_layers: expected an integer"),
    (["model.tie_embeddings=maybe"], r"model\.tie_embeddings: expected true/false"),
    (["objective.kind=ddpm"], r"objective\.kind: 'ddpm' is not allowed; choose one of \['imm', 'flow'\]"),
    (["optim.betas=[0.9]"], r"optim\.betas: expected 2 items"),
    (["model.n_heads=3"], r"model\.d_model: 256 is not divisible by n_heads=3"),
    (["model.n_kv_heads=3"], r"model\.n_kv_heads: 3 must divide n_heads=4"),
    (["objective.eps=0.5", "objective.T=0.4"], r"objective\.eps/T: need 0 <= eps < T < 1"),
    (["data.t2i_ratio=1.5"], r"data\.t2i_ratio: must be in \[0, 1\]"),
    (["objective.s_eps_share=-0.1"], r"objective\.s_eps_share: must be in \[0, 1\], got -0\.1"),
    (["objective.s_eps_share=1"], r"objective\.s_eps_share: 1 trains at s = eps alone.*imm_sampler=restart"),
    (["dist.zero_stage=4"], r"dist\.zero_stage: must be 0, 1, 2 or 3"),
    (["dist.engine=plain", "dist.zero_stage=2"], r"dist\.engine: 'plain' has no ZeRO"),
    (["objective.text_weight=0", "data.t2i_ratio=0.5"], r"objective\.text_weight: is 0"),
    (["data.max_text_tokens=600", "data.row_len=512"], r"data\.max_text_tokens: 600 must be < row_len=512"),
    (["optim.lr"], r"must look like key\.sub=value"),
])
def test_bad_overrides_fail_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  n_layerz: 3\n")
    with pytest.raises(ConfigError, match=r"model\.n_layerz: unknown key in model"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)
    p.write_text("model: 3\n")
    with pytest.raises(ConfigError, match=r"model: is a section"):
        load_config(p)


def test_run_config_saved_before_an_option_keeps_what_the_run_used(tmp_path):
    import yaml

    from nextx.checkpoint import load_run_config

    new = tmp_path / "new.yaml"
    save_config(load_config(None, []), new)
    assert load_run_config(new).model.rope2d_freqs == "own"
    assert load_run_config(new).objective.null_prompt == "hidden"
    tree = yaml.safe_load(new.read_text())
    del tree["model"]["rope2d_freqs"]                       # a run saved before the options existed
    del tree["objective"]["null_prompt"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(tree))
    assert load_run_config(old).model.rope2d_freqs == "shared"
    assert load_run_config(old).objective.null_prompt == "pad"
    assert load_config(old).model.rope2d_freqs == "own"    # a plain config file takes today's default
    assert load_config(old).objective.null_prompt == "hidden"
