"""Expected errors: mistakes in what a user gave (a file, a value, a config, a checkpoint), reported by the `nextx`
command as one or two lines naming the problem and the fix, exit code 2, with no traceback (`nextx --debug ...`
or NEXTX_DEBUG=1 shows it). Anything else is a bug and keeps its traceback."""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's input that the message alone explains (what is wrong, where, and how to fix it)."""


def describe(e: BaseException) -> str | None:
    """The one-paragraph message of an expected error, or None for an unexpected one (a bug)."""
    import yaml

    if isinstance(e, UserError):
        msg = str(e)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the worker's own message
            last = [x for x in msg.splitlines() if x.strip()][-1]
            msg = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(type(e).__name__) else last
        return msg
    if isinstance(e, OSError) and isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError,
                                                 NotADirectoryError, FileExistsError)):
        what = {FileNotFoundError: "no such file or directory", PermissionError: "permission denied",
                IsADirectoryError: "is a directory, a file was expected",
                NotADirectoryError: "is not a directory", FileExistsError: "already exists"}[type(e)]
        name = e.filename if e.filename is not None else ""
        extra = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
        return f"{name}{extra}: {what}" if name else f"{what}: {e}"
    if isinstance(e, OSError) and e.errno == 28:
        return f"no space left on device{f' writing {e.filename}' if e.filename else ''}"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
    if isinstance(e, yaml.YAMLError):
        return f"YAML error: {e}"
    return None


def refuse_existing(out, force: bool, what: str, pattern: str = "*") -> None:
    """Writers of data and tokenizers never replace an earlier output silently: an `out` holding entries that match
    `pattern` (shards: "*.tar") needs --force."""
    from pathlib import Path

    p = Path(out)
    if force or not p.exists():
        return
    n = sum(1 for _ in p.glob(pattern)) if p.is_dir() else 1
    if n:
        raise UserError(f"{p} already holds {what} ({n} entr{'y' if n == 1 else 'ies'}); nothing was written. Pass "
                        "--force to replace it, or choose another --out")
