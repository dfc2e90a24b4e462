"""The `nextx` command: one entry point, subcommands grouped by what they work on.

    nextx data shapes --out data/shapes32 --n 1000      nextx tokenizer text --shards data/shapes32 --out ...
    nextx data inspect data/shapes32                    nextx config configs/tiny.yaml model.n_layers=2
    nextx demo                                          nextx <group> --help, nextx <group> <command> --help

Every command is a `main(argv) -> int` of its own module (its argparse gives its --help), so the same job runs
as `python -m data_tools.shapes ...`. Jobs under tokenizers/ are run by path: that folder must not be a package
(it would shadow Hugging Face's `tokenizers`), so they ship with the repository clone, not the wheel.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# group -> command -> (target, one-line help). Target: "module:function" or "path/in/repo.py".
COMMANDS: dict[str, dict[str, tuple[str, str]]] = {
    "data": {
        "shapes": ("data_tools.shapes:main", "procedural shapes scenes with exact captions -> shards"),
        "emoji": ("data_tools.emoji:main", "Noto Color Emoji renders with their names -> shards"),
        "folder": ("data_tools.folder:main", "a folder of images + .txt captions, or a jsonl of pairs -> shards"),
        "interleaved": ("data_tools.interleaved:main", "a jsonl of text/image segment lists -> shards"),
        "inspect": ("data_tools.inspect:main", "counts, sizes, bad samples and a PNG grid of a shard dir"),
        "rows": ("data_tools.rows:main", "packed rows through the real DataLoader: packing efficiency, rows/s"),
        "encode": ("data_tools.encode_latents:main", "pre-encode image latents into a copy of the shards"),
    },
    "tokenizer": {
        "text": ("tokenizers/text/train_spm.py", "train a SentencePiece BPE on the texts of shards"),
        "pixel": ("tokenizers/image/pixel_stats.py", "pixel-patch image tokenizer with measured stats"),
        "image": ("tokenizers/image/train_ae.py", "train the KL autoencoder image tokenizer"),
    },
    "eval": {
        "shapes-selfcheck": ("evals.shapes_score:main", "scorer self-check: ground truth vs shuffled captions"),
        "shapes": ("evals.shapes_eval:main", "held-out shapes prompts: fact accuracy per step count, captions"),
        "overfit": ("evals.overfit:main", "learning proof: overfit 8 shapes images, generate and caption them back"),
        "reference": ("evals.reference:main", "calibration: a minimal DiT-style flow model on the same shards and scorer"),
        "attention": ("evals.attention_locality:main", "attention inside an image: mass, entropy, cell distance per layer"),
        "report": ("evals.report:main", "the full report: IMM 1/2/4/8 (+ flow 8/25/50) steps, exact scores, CLIP, "
                   "FD, latency, captions, perplexity -> report.md/json + plots"),
    },
    "clip": {
        "train": ("evals.clip_train:main", "a small in-domain CLIP on nextx shards (open_clip classes and loss)"),
    },
    "train": {"": ("nextx.train:main", "train a model: CONFIG [key=value ...] (torchrun/deepspeed launchable)")},
    "t2i": {"": ("nextx.infer:t2i_main", "text-to-image: RUN --prompt ... | --prompts-file F --out DIR")},
    "caption": {"": ("nextx.infer:caption_main", "caption images: RUN IMAGES... --out captions.json|.csv")},
    "generate": {"": ("nextx.infer:generate_main", "interleaved text and images: RUN --prompt ... --out DIR")},
    "config": {"": ("nextx.cli:print_config", "print the resolved config: CONFIG [key=value ...]")},
    "demo": {"": ("nextx.demo:main", "the main job end to end on built-in data (see README)")},
}


def _usage() -> str:
    lines = ["usage: nextx <group> [<command>] [args ...]", "",
             "One transformer for next-X prediction: text token by token, images in a few IMM steps.", ""]
    for group, cmds in COMMANDS.items():
        if "" in cmds:
            lines.append(f"  {group:<28}{cmds[''][1]}")
            continue
        for name, (_, help_) in cmds.items():
            lines.append(f"  {group + ' ' + name:<28}{help_}")
    lines += ["", "Each command takes --help."]
    return "\n".join(lines)


def _group_usage(group: str) -> str:
    lines = [f"usage: nextx {group} <command> [args ...]", ""]
    lines += [f"  {name:<20}{help_}" for name, (_, help_) in COMMANDS[group].items()]
    return "\n".join(lines)


def _call(target: str, argv: list[str], prog: str) -> int:
    if target.endswith(".py"):
        path = REPO / target
        if not path.is_file():
            raise SystemExit(f"nextx: {path} not found; the tokenizer jobs ship with the repository: run nextx "
                             f"from a clone installed with `pip install -e .`")
        fn = runpy.run_path(str(path), run_name="nextx_job")["main"]
    else:
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
    sys.argv = [prog] + argv  # argparse inside the job names itself by its own prog=, this is for tracebacks
    return int(fn(argv) or 0)


def print_config(argv: list[str]) -> int:
    import argparse

    import yaml

    from nextx.config import ConfigError, load_config, to_dict

    p = argparse.ArgumentParser(prog="nextx config", description="Print the resolved config (defaults <- YAML <- "
                                "overrides) after all checks; exits 2 naming the bad key otherwise.")
    p.add_argument("config", help="YAML file, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value ...")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"nextx config: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`nextx [--debug] <group> [<command>] ...`: expected errors (nextx.errors) print one message, exit 2; Ctrl-C
    prints one line, exit 130; --debug (or NEXTX_DEBUG=1) lets every traceback through."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("NEXTX_DEBUG", "") not in ("", "0")
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if debug:
        return _dispatch(argv)
    from nextx.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, describe

    prog = "nextx"
    if argv and argv[0] in COMMANDS:
        prog += " " + argv[0]
        if "" not in COMMANDS[argv[0]] and len(argv) > 1 and argv[1] in COMMANDS[argv[0]]:
            prog += " " + argv[1]
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one top-level handler: expected errors are one message
        msg = describe(e)
        if msg is None:
            raise
        print(f"{prog}: error: {msg}\n(nextx --debug ... shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    group, rest = argv[0], argv[1:]
    if group not in COMMANDS:
        print(f"nextx: unknown command {group!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    cmds = COMMANDS[group]
    if "" in cmds:
        return _call(cmds[""][0], rest, f"nextx {group}")
    if not rest or rest[0] in ("-h", "--help"):
        print(_group_usage(group))
        return 0 if rest else 2
    if rest[0] not in cmds:
        print(f"nextx {group}: unknown command {rest[0]!r}\n\n{_group_usage(group)}", file=sys.stderr)
        return 2
    return _call(cmds[rest[0]][0], rest[1:], f"nextx {group} {rest[0]}")


if __name__ == "__main__":
    raise SystemExit(main())
