"""Train the text tokenizer (SentencePiece BPE) on the texts of WebDataset shards or of a text file.

    nextx tokenizer text --shards data/shapes32 --out data/tok/text --vocab-size 256
    python tokenizers/text/train_spm.py --text-file corpus.txt --out data/tok/text --vocab-size 8000

Reads only the `json` member of each sample (the document's segments), never the images, and skips the
samples the training reader would skip (bad json, malformed segments, a missing image member), so the
tokenizer is fitted to exactly the texts the model will see. Writes OUT/tokenizer.model and OUT/tokenizer.json
(nextx.tokenizer.train_sentencepiece) and prints a summary: texts, vocab, time, tokens per text and the
fraction of <unk> on the training texts (non-zero only if character_coverage < 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from itertools import islice
from typing import Iterator

from nextx.data import raw_samples
from nextx.documents import BadSample, shard_paths
from nextx.tokenizer import train_sentencepiece

log = logging.getLogger("nextx.tokenizer")


def sample_texts(sample: dict) -> list[str]:
    """The text segments of one raw sample, checked as `decode_document` checks them, without touching pixels."""
    key = sample.get("__key__", "?")
    try:
        segments = json.loads(sample["json"])["segments"]
    except (KeyError, TypeError, ValueError) as e:  # no json member, bad json, no segments key
        raise BadSample(f"{key}: no readable segments ({e!r})") from None
    if not isinstance(segments, list) or not segments:
        raise BadSample(f"{key}: 'segments' is not a non-empty list")
    texts = []
    for i, s in enumerate(segments):
        if isinstance(s, dict) and len(s) == 1 and isinstance(s.get("text"), str) and s["text"].strip():
            texts.append(s["text"])
        elif not (isinstance(s, dict) and len(s) == 1 and isinstance(s.get("image"), str)
                  and (f"{s['image']}.png" in sample or f"{s['image']}.lat.npy" in sample)):
            raise BadSample(f"{key}: segment {i} is neither a non-empty text nor an image with its member: {s!r}")
    return texts


def iter_texts(paths: list[str], stats: dict | None = None) -> Iterator[str]:
    """Text segments of every sample of the tar files, in order. Bad samples and unreadable tar data are
    skipped, counted in `stats` ("bad_sample", "bad_tar") and logged (the first five, then every 1000th)."""
    stats = {} if stats is None else stats
    for path in paths:
        for sample in raw_samples(path, stats):
            try:
                texts = sample_texts(sample)
            except BadSample as e:
                stats["bad_sample"] = stats.get("bad_sample", 0) + 1
                if stats["bad_sample"] <= 5 or stats["bad_sample"] % 1000 == 0:
                    log.warning("skipping bad sample (%d so far): %s", stats["bad_sample"], e)
                continue
            stats["docs"] = stats.get("docs", 0) + 1
            yield from texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx tokenizer text", description="Train a SentencePiece BPE text tokenizer "
                                "with the nextx special tokens on the texts of shards or of a text file.")
    p.add_argument("--shards", nargs="+", metavar="DIR_OR_PATTERN", help="shard dirs, .tar files or brace patterns")
    p.add_argument("--text-file", metavar="FILE", help="UTF-8 text, one training text per line (with --shards: "
                   "read as well, e.g. a shapes shard dir's language.txt)")
    p.add_argument("--split", default="train", help="split of shard dirs (default: train; '' = every .tar)")
    p.add_argument("--out", required=True, help="output dir for tokenizer.model + tokenizer.json")
    p.add_argument("--force", action="store_true", help="replace what --out already holds")
    p.add_argument("--vocab-size", type=int, default=2048, help="total ids incl. specials (default: 2048)")
    p.add_argument("--max-texts", type=int, default=None, help="train on the first N texts of each source only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--character-coverage", type=float, default=1.0, help="share of characters with a piece")
    p.add_argument("--byte-fallback", action="store_true", help="spend 256 ids on raw bytes: no <unk> ever")
    a = p.parse_args(argv)
    if not (a.shards or a.text_file):
        p.error("give --shards, --text-file or both")
    from nextx.errors import refuse_existing

    refuse_existing(a.out, a.force, "a tokenizer")

    t0 = time.time()
    stats: dict = {}
    try:
        sources, texts = [], []
        if a.shards:
            paths = [path for s in a.shards for path in shard_paths(s, a.split or None)]
            sources.append(" ".join(a.shards))
            texts = list(islice(iter_texts(paths, stats), a.max_texts))
        if a.text_file:
            with open(a.text_file, encoding="utf-8") as f:
                texts += list(islice((line.rstrip("\n") for line in f), a.max_texts))
            sources.append(a.text_file)
        source = " + ".join(sources)
        # held in memory: the summary re-encodes them, and sentencepiece keeps its own copy anyway
        texts = [t for t in texts if t]
        tok = train_sentencepiece(texts, a.out, vocab_size=a.vocab_size, seed=a.seed, source=source,
                                  character_coverage=a.character_coverage, byte_fallback=a.byte_fallback)
    except (FileNotFoundError, ValueError) as e:
        print(f"nextx tokenizer text: {e}", file=sys.stderr)
        return 2
    train_s = time.time() - t0
    n_tok = n_unk = 0
    for ids in tok.encode_batch(texts):
        n_tok += len(ids)
        n_unk += ids.count(tok.unk_id)
    n_chars = sum(len(t) for t in texts)
    where = "; ".join(([f"{stats.get('docs', 0)} documents, skipped {stats.get('bad_sample', 0)} bad samples and "
                        f"{stats.get('bad_tar', 0)} unreadable tar members"] if a.shards else [])
                      + (["the text file one per line"] if a.text_file else []))
    print(f"texts {len(texts)} ({where}) from {source}")
    print(f"vocab {tok.vocab_size} (specials {tok.special_tokens}) read + trained in {train_s:.1f}s -> {a.out}")
    print(f"tokens/text {n_tok / len(texts):.2f}, chars/token {n_chars / max(n_tok, 1):.2f}, "
          f"unk fraction {n_unk / max(n_tok, 1):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
