"""The `nextx` CLI: --help at every level, unknown commands, config errors, and the console script itself."""

import subprocess
import sys
from pathlib import Path

import pytest

from nextx.cli import COMMANDS, main

ALL = [(g, c) for g, cmds in COMMANDS.items() for c in cmds]


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for g, c in ALL:
        assert f"{g} {c}".strip() in out


@pytest.mark.parametrize("group, cmd", ALL, ids=[f"{g}-{c}" if c else g for g, c in ALL])
def test_every_command_has_help(group, cmd, capsys):
    argv = [group] + ([cmd] if cmd else []) + ["--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and f"nextx {group}" in out


def test_group_help_and_unknown(capsys):
    assert main(["data", "--help"]) == 0 and "shapes" in capsys.readouterr().out
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert main(["data", "nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert main([]) == 2


def test_config_command(capsys):
    cfg = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    assert main(["config", cfg, "model.n_layers=3"]) == 0
    assert "n_layers: 3" in capsys.readouterr().out
    assert main(["config", cfg, "model.n_layerz=3"]) == 2
    assert "model.n_layerz: unknown key" in capsys.readouterr().err


def test_console_script_runs():
    exe = Path(sys.executable).parent / "nextx"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "data shapes" in r.stdout
