"""`nextx demo`'s reuse rule: shards generated with other settings are rebuilt, not silently reused."""

from data_tools.shapes import main as shapes_main
from nextx.demo import _stale_shards


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
    (old / "language.txt").unlink()                                            # written before language.txt
    assert _stale_shards(old, 20, "2,1,1", 0.5) == "no language.txt (an older generator)"
