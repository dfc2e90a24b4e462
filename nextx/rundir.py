"""A run directory is never silently reused or shared (rank 0 of a training owns it):

- `claim`: the directory is writable (checked before any work), and an advisory lock (`RUN/.lock`, fcntl, held
  for the life of the process and released by the OS if it dies) stops a second concurrent writer.
- `conflict`: a run dir that already holds another run (a config.yaml whose resume keys differ) is refused with
  the differing keys named; `train.if_exists=new_run` writes NAME-2, NAME-3, ... instead.
- `dedup_metrics`: on resume from step S, metrics.jsonl keeps only rows of steps <= S (the later ones are replayed)
  and drops a torn last line.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from nextx.errors import UserError

LOCK = ".lock"


class RunLock:
    """An exclusive advisory lock on RUN/.lock, holding the owner's host and pid for the error message."""

    def __init__(self, out: Path):
        import fcntl

        self.path = out / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(f"{out} is being written by another training ({owner}); wait for it, or give this one "
                            f"another name=") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock; the file stays (harmless, reused by the next run)
            self.fd = None


def check_writable(out: Path) -> None:
    """Create `out` and write a probe file in it (and in its checkpoints/ if present) now, not at the first save."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for d in (out, out / "checkpoints"):
            if d.is_dir():
                probe = d / f".write_probe_{os.getpid()}"
                probe.write_text("")
                probe.unlink()
    except OSError as e:
        raise UserError(f"run dir {out} is not writable ({e.strerror}); choose run_dir= on a writable filesystem "
                        f"or fix its permissions") from None


def claim(out: Path) -> RunLock:
    check_writable(out)
    return RunLock(out)


def next_free(out: Path) -> Path:
    """NAME-2, NAME-3, ... : the first sibling of `out` that does not hold a run."""
    k = 2
    while (out.parent / f"{out.name}-{k}" / "config.yaml").exists():
        k += 1
    return out.parent / f"{out.name}-{k}"


def conflict_message(out: Path, diff: list[str]) -> str:
    return (f"{out} already holds a run with a different config ({', '.join(diff)}); nothing was changed. Give "
            f"this run another name=, or set train.if_exists=new_run to write {next_free(out).name}, or move the "
            f"old run away")


def dedup_metrics(out: Path, step: int) -> int:
    """Keep the rows of metrics.jsonl with step <= `step` (the resume point) and drop unparsable lines (a write cut
    by a kill). Returns the number of rows dropped."""
    f = out / "metrics.jsonl"
    if not f.is_file():
        return 0
    keep, dropped = [], 0
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = f.with_suffix(".jsonl.partial")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(f)
    return dropped
