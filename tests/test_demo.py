"""`nextx demo`'s reuse rules: shards generated with other settings are rebuilt, not silently reused; a run trained
with another recipe is moved aside, not resumed or deleted."""

from data_tools.shapes import main as shapes_main
from nextx.cli import REPO
from nextx.config import load_config, save_config
from nextx.demo import _move_other_recipe, _stale_shards


def test_stale_shards_names_what_differs(tmp_path):
    out = tmp_path / "shapes32"
    assert _stale_shards(out, 20, "2,1,1", 1.0) == ""                          # nothing there yet
    assert shapes_main(["--out", str(out), "--n", "20", "--heldout-n", "4", "--object-weights", "2,1,1",
                        "--position-rate", "1"]) == 0
    assert _stale_shards(out, 20, "2,1,1", 1.0) == ""
    assert _stale_shards(out, 20, "2,1,1", 0.5) == "position_rate 1.0 instead of 0.5"
    assert _stale_shards(out, 40, "1,1,1", 1.0) == ("train docs 20 instead of 40, object_weights [2.0, 1.0, 1.0] "
                                                    "instead of [1.0, 1.0, 1.0]")
    old = tmp_path / "old"                                                     # written before --position-rate
    assert shapes_main(["--out", str(old), "--n", "20", "--heldout-n", "4", "--object-weights", "2,1,1"]) == 0
    assert _stale_shards(old, 20, "2,1,1", 0.5) == ""
    assert "position_rate 0.5 instead of 1.0" in _stale_shards(old, 20, "2,1,1", 1.0)
    assert _stale_shards(out, 20, "2,1,1", 1.0, 0.0) == "position_jitter 1.0 instead of 0.0"
    still = tmp_path / "still"
    assert shapes_main(["--out", str(still), "--n", "20", "--heldout-n", "4", "--object-weights", "2,1,1",
                        "--position-rate", "1", "--position-jitter", "0"]) == 0
    assert _stale_shards(still, 20, "2,1,1", 1.0, 0.0) == ""
    (old / "language.txt").unlink()                                            # written before language.txt
    assert _stale_shards(old, 20, "2,1,1", 0.5) == "no language.txt (an older generator)"


def test_a_run_of_another_recipe_is_moved_aside_whole(tmp_path):
    recipe = str(REPO / "configs" / "demo.yaml")
    args = [recipe, "name=demo", f"run_dir={tmp_path}"]
    run = tmp_path / "demo"
    assert _move_other_recipe(run, args) is None                                  # no run yet
    run.mkdir()
    save_config(load_config(recipe, args[1:]), run / "config.yaml")
    (run / "metrics.jsonl").write_text("{}\n")
    assert _move_other_recipe(run, args) is None and run.is_dir()               # the same recipe: resumed later
    assert _move_other_recipe(run, args + ["train.steps=7"]) is None             # train.* is not the recipe's identity
    older = args + ["data.row_len=256", "data.batch_rows=8"]                    # e.g. written by an older demo
    save_config(load_config(recipe, older[1:]), run / "config.yaml")
    to = _move_other_recipe(run, args)
    assert to == tmp_path / "demo-2" and not run.exists()
    assert (to / "metrics.jsonl").read_text() == "{}\n"                          # moved whole, nothing deleted
    run.mkdir()                                 # the same recipe, but the data stages were just rebuilt under it
    save_config(load_config(recipe, args[1:]), run / "config.yaml")
    assert _move_other_recipe(run, args, data_changed="") is None and run.is_dir()
    assert _move_other_recipe(run, args, data_changed="position_jitter 1.0 instead of 0.0") == tmp_path / "demo-3"
    assert not run.exists() and _move_other_recipe(run, args, data_changed="x") is None          # nothing there
