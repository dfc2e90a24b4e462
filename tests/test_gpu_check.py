"""The GPU check's CPU smoke test: `bash bench/gpu_check.sh --tiny OUT` runs every section at toy size, so the
script cannot reach a GPU with a typo in it. On this CPU machine the CUDA-only sections report 'skipped' with their
reason; everything else must pass."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "pytest_gpu", "train_zero2", "throughput", "t2i_latency", "caption", "host_syncs", "train_zero3",
            "xformers"]


def test_gpu_check_tiny_runs_every_section(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny", str(tmp_path / "gc")],
                       capture_output=True, text=True, timeout=600)
    res = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert list(res["sections"]) == SECTIONS
    bad = {n: s for n, s in res["sections"].items() if s["status"] not in ("ok", "skipped")}
    assert not bad and r.returncode == 0, json.dumps(bad, indent=1)[-3000:] + r.stderr[-2000:]
    z2 = res["sections"]["train_zero2"]
    assert z2["killed_rc"] != 0 and z2["resume_rc"] == 0 and z2["duplicate_rows"] == 0 and z2["ce_last"] < z2["ce_first"]
    assert "grid.png" in res["sections"]["train_zero3"]["t2i_files"]
    assert res["sections"]["throughput"]["records"]
    skipped = {n: s["reason"] for n, s in res["sections"].items() if s["status"] == "skipped"}
    assert all(skipped.values())                                         # every skip says why
    md = (tmp_path / "gc" / "gpu_check.md").read_text()
    assert all(f"| {n} |" in md for n in SECTIONS) and "IMM 4 steps" in md
