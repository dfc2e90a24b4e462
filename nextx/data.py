"""Streaming reading pipeline: WebDataset shards -> documents -> tokens -> packed rows -> Batch (docs/design.md §8).

Named stages over plain values, each testable alone:

    shard_order     which shards this reader (rank x worker) reads, epoch by epoch: a per-epoch shuffle shared by
                    all ranks, split by node and worker; with fewer shards than readers, every reader walks all
                    shards and keeps every (world*workers)-th sample instead, so no sample is read twice
    raw_samples     tar -> raw sample dicts; unreadable tar members are counted, never raised
    shuffled        seeded in-memory shuffle buffer over raw samples (cheap: PNG bytes, not tensors)
    to_segments     Document -> tokenized segments (text ids, ImageTokens); pairs laid out caption->image with
                    probability t2i_ratio, else image->caption (image as pure context). Two steps:
                    tokenize_document (deterministic) then choose_layout (one rng draw per pair)
    PackedRows      the IterableDataset tying it together: decode (BadSample -> skip, count, log), tokenize,
                    layout, pack; counters ride along in every row's `stats`. With data.cache_docs each reader
                    keeps what tokenize_document returned (or the BadSample it raised) per (shard, key), and the
                    keys of every shard it read whole: later epochs walk those instead of the tar, and give the
                    same rows and counters (a batch of 24 demo documents: 7.5 -> 1.5 ms on one core)

`build_loader(cfg.data, rank, world_size)` returns the DataLoader of Batches the trainer consumes.

Read position (exact resume, docs/design.md §8). Each reader restarts its state at every epoch: its rng is drawn from
(seed, reader, epoch), the shuffle buffer drains and the packer flushes at the epoch's end. So "reader r has
yielded n rows of epoch e" pins the stream, and every batch carries `position = (reader index, e, n)` of its last
row (`LoaderBatch`). The trainer keeps the newest position per reader of the batches it *consumed* (not the ones
prefetched) and checkpoints them with its batch count; `build_loader(start=..., batches_done=...)` then replays
each reader's epoch up to its position without yielding (decode + tokenize + pack, no collate or transfer; cheap
with pre-encoded latents) and rotates the DataLoader workers so the next batch comes from the reader that was
next. Exact when world size and data.num_workers are unchanged.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, fields, replace
from typing import Iterator

import numpy as np
import torch
from PIL import Image as PILImage

from nextx.config import DataConfig
from nextx.documents import (BadSample, Document, Image, Text, decode_document, recorded_doc_counts,
                             shard_paths)
from nextx.errors import UserError
from nextx.sequence import Batch, ImageTokens, Packer, Row, SpecialIds, collate, layout_document, trim_pads

log = logging.getLogger("nextx.data")


@dataclass(frozen=True)
class Reader:
    """Where this reader sits: rank of world_size processes, worker of n_workers DataLoader workers."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    n_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.n_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.n_workers


def shard_order(shards: list[str], reader: Reader, *, seed: int, epoch: int, shuffle: bool,
                resample: bool) -> tuple[list[str], int]:
    """Shards this reader reads in `epoch`, and the sample stride (1, or reader.count for sample-level split).

    All readers derive the same epoch permutation from (seed, epoch), so their shard subsets are disjoint and
    together cover every shard. resample=True draws the reader's shards with replacement instead.
    """
    order = list(shards)
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if len(order) >= reader.count:
        mine = order[reader.index::reader.count]
        stride = 1
    else:  # too few shards to give each reader its own: split by sample instead
        mine, stride = order, reader.count
    if resample:
        rng_r = random.Random((seed * 1_000_003 + epoch) * 7919 + reader.index)
        mine = rng_r.choices(mine, k=len(mine))
    return mine, stride


class DataError(UserError):
    """The data cannot feed the run: every document too long for a row, a flood of bad samples, a truncated shard."""


def longest_pair(cfg: DataConfig, n_image_tokens: int) -> int:
    """Tokens of the longest caption+image document the layout can write (docs/design.md §1): a caption of
    max_text_tokens, and either <bos> caption <boi> M noise splits [clean <eoi>] <eos> (caption->image) or
    <bos> <boi> clean <eoi> caption <eos> (image->caption, when t2i_ratio < 1)."""
    T, N, M = cfg.max_text_tokens, n_image_tokens, cfg.noise_copies
    t2i = 2 + T + M * N + (0 if cfg.drop_trailing_clean else N + 2)
    i2t = 4 + N + T if cfg.t2i_ratio < 1 else 0
    return max(t2i if cfg.t2i_ratio > 0 else 0, i2t)


def check_packing(cfg: DataConfig, n_image_tokens: int) -> None:
    """Refuse, before any work, a row that cannot hold the longest caption+image document (every such document
    would be dropped and the loader would read forever), naming sizes that fit."""
    need = longest_pair(cfg, n_image_tokens)
    if need <= cfg.row_len:
        return
    spare = cfg.row_len - (need - cfg.max_text_tokens)
    fix = (f"or data.max_text_tokens <= {spare}" if spare >= 8 else
           "(an image alone does not fit: use fewer image tokens, or data.noise_copies=1)")
    raise DataError(f"data.row_len={cfg.row_len} cannot hold one caption+image document: up to {need} tokens "
                    f"({n_image_tokens} image tokens x {cfg.noise_copies} noise cop{'y' if cfg.noise_copies == 1 else 'ies'}"
                    f"{'' if cfg.drop_trailing_clean else ' + a clean split'}, a caption of up to "
                    f"data.max_text_tokens={cfg.max_text_tokens}, markers). Set data.row_len >= {need} {fix}")


class _Counter:
    """A webdataset error handler that counts and logs, then continues."""

    def __init__(self, stats: dict, key: str):
        self.stats, self.key = stats, key

    def __call__(self, exn: Exception) -> bool:
        self.stats[self.key] = self.stats.get(self.key, 0) + 1
        if self.stats[self.key] <= 5 or self.stats[self.key] % 1000 == 0:
            log.warning("skipping unreadable shard data (%d so far): %r", self.stats[self.key], exn)
        return True


def raw_samples(path: str, stats: dict) -> Iterator[dict]:
    """Raw sample dicts (field -> bytes, plus __key__) of one tar, in file order."""
    import webdataset as wds

    handler = _Counter(stats, "bad_tar")
    yield from wds.tarfile_to_samples(handler=handler)([{"url": path}])


def shard_images(paths: list[str], stats: dict, limit: int | None = None) -> Iterator[PILImage.Image]:
    """The RGB images of every document in the tar files, in order, up to `limit`. Bad samples and unreadable
    tar data are skipped and counted in `stats` ("bad_sample", "bad_tar"); "docs" counts the good documents."""
    n = 0
    for path in paths:
        for sample in raw_samples(path, stats):
            if limit is not None and n >= limit:
                return
            try:
                doc = decode_document(sample)
            except BadSample:
                stats["bad_sample"] = stats.get("bad_sample", 0) + 1
                continue
            stats["docs"] = stats.get("docs", 0) + 1
            for im in doc.images:
                if im.pixels is None:
                    continue
                if limit is not None and n >= limit:
                    return
                n += 1
                yield im.pixels


def shuffled(it: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Seeded shuffle buffer: fill to `buffer` items, then yield a random one per new item; drain at the end."""
    if buffer <= 1:
        yield from it
        return
    buf: list = []
    for x in it:
        if len(buf) < buffer:
            buf.append(x)
            continue
        i = rng.randrange(buffer)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


def tokenize_document(doc: Document, text_tok, image_tok, *, max_text_tokens: int,
                      use_latents: str) -> tuple[list, int]:
    """Document -> (segments: text ids and ImageTokens(generate=True) in document order, texts truncated to
    max_text_tokens). Deterministic: the part of `to_segments` that `data.cache_docs` keeps."""
    tokens = iter(_image_tokens(doc.images, image_tok, use_latents, doc.key))
    out: list = []
    truncated = 0
    for seg in doc.segments:
        if isinstance(seg, Text):
            ids = text_tok.encode(seg.text)
            if len(ids) > max_text_tokens:
                truncated += 1
                ids = ids[:max_text_tokens]
            if ids:
                out.append(ids)
        else:
            out.append(ImageTokens(next(tokens), image_tok.grid, generate=True))
    return out, truncated


def choose_layout(segments: list, is_pair: bool, *, t2i_ratio: float, rng: random.Random) -> list:
    """A caption+image pair stays caption->image with probability t2i_ratio, else becomes image->caption (the image
    as pure context); anything else is returned as it is. One rng draw per pair of two segments."""
    if is_pair and len(segments) == 2 and rng.random() >= t2i_ratio:
        text_ids, im = segments
        return [ImageTokens(im.tokens, im.grid, generate=False), text_ids]
    return segments


def cut_caption(segments: list, word_starts, *, rate: float, rng: random.Random) -> list:
    """A caption->image document [text ids, ImageTokens(generate=True)] -> with probability `rate` the same with its
    caption cut to a whole-word prefix (`data.caption_cut`): 1 to n-1 of its n words, uniformly; so a prompt that
    says less than the training captions (no place, no size) is one the model has seen. word_starts(ids) -> the
    indices where a word begins (`TextTokenizer.word_starts`). Anything else, and a one-word caption, is returned as
    it is. One rng draw per caption->image document, a second when cut; none at rate 0."""
    if (rate <= 0 or len(segments) != 2 or isinstance(segments[0], ImageTokens)
            or not isinstance(segments[1], ImageTokens) or not segments[1].generate):
        return segments
    if rng.random() >= rate:
        return segments
    starts = word_starts(segments[0])
    if len(starts) < 2:
        return segments
    return [segments[0][:starts[rng.randint(1, len(starts) - 1)]], segments[1]]


def _laid_out(tokenized: tuple[list, bool, int], t2i_ratio: float, rng: random.Random, stats: dict) -> list:
    """(segments, is_pair, truncated texts) -> the segments in their drawn layout; truncations counted in stats."""
    segs, is_pair, truncated = tokenized
    if truncated:
        stats["truncated_text"] = stats.get("truncated_text", 0) + truncated
    return choose_layout(segs, is_pair, t2i_ratio=t2i_ratio, rng=rng)


def to_segments(doc: Document, text_tok, image_tok, *, t2i_ratio: float, max_text_tokens: int,
                use_latents: str, rng: random.Random, stats: dict) -> list:
    """Document -> tokenized segments for `layout_document` (text -> ids, image -> ImageTokens)."""
    segs, truncated = tokenize_document(doc, text_tok, image_tok, max_text_tokens=max_text_tokens,
                                        use_latents=use_latents)
    return _laid_out((segs, doc.is_pair(), truncated), t2i_ratio, rng, stats)


def _image_tokens(images: list[Image], image_tok, use_latents: str, key: str) -> list[np.ndarray]:
    """Latent tokens (N, C) per image: pre-encoded ones when allowed and matching, else encoded from pixels."""
    if not images:
        return []
    n, c = image_tok.grid[0] * image_tok.grid[1], image_tok.token_dim
    out: list[np.ndarray | None] = [None] * len(images)
    if use_latents != "pixels":
        for i, im in enumerate(images):
            if im.latents is not None:
                if im.latents.shape != (n, c):
                    raise ValueError(f"{key}: stored latents of shape {im.latents.shape} do not match the image "
                                     f"tokenizer's ({n}, {c}); re-encode the shards with `nextx data encode`")
                out[i] = im.latents.astype(np.float32)
            elif use_latents == "latents":
                raise ValueError(f"{key}: data.use_latents='latents' but image {im.name!r} has no stored latents; "
                                 f"run `nextx data encode` or set data.use_latents=auto")
    todo = [i for i, x in enumerate(out) if x is None]
    if todo:
        from nextx.latents import pil_to_tensor

        missing = [images[i] for i in todo if images[i].pixels is None]
        if missing:
            raise BadSample(f"{key}: image {missing[0].name!r} has no pixels to encode")
        with torch.no_grad():
            x = pil_to_tensor([images[i].pixels for i in todo], image_tok.image_size)
            enc = image_tok.encode(x).float().numpy()
        for j, i in enumerate(todo):
            out[i] = enc[j]
    return out  # type: ignore[return-value]


class PackedRows(torch.utils.data.IterableDataset):
    """Infinite (loop=True) or single-pass stream of packed Rows for one rank; DataLoader workers split it."""

    def __init__(self, cfg: DataConfig, *, shards: str | None = None, split: str | None = None, rank: int = 0,
                 world_size: int = 1, loop: bool = True, seed_offset: int = 0, start: dict | None = None,
                 rotate: int = 0):
        """start: {reader index: (epoch, rows done in that epoch)} to resume from (see the module docstring);
        rotate: DataLoader worker i acts as reader worker (i + rotate) % num_workers."""
        self.cfg = cfg
        self.paths = shard_paths(shards or cfg.train_shards, split if split is not None else cfg.train_split)
        self.rank, self.world_size, self.loop, self.seed = rank, world_size, loop, cfg.seed + seed_offset
        self.start = {int(k): (int(v[0]), int(v[1])) for k, v in (start or {}).items()}
        self.rotate = rotate
        self._tok = None
        self._n_bad = 0
        self._seen = 0                      # samples decoded by this reader (bad ones included)
        self._bad_shards: dict[str, int] = {}
        self._expected = recorded_doc_counts(self.paths)
        # data.cache_docs: (shard, key) -> (segments, is_pair, truncated texts) or the BadSample it raised; and per
        # shard read whole and clean, its keys in file order (later epochs walk them instead of the tar)
        self._docs: dict[tuple[str, str], tuple | BadSample] = {}
        self._shard_keys: dict[str, list[str]] = {}

    def tokenizers(self):
        """(text tokenizer, image tokenizer), loaded once per process (each worker loads its own copy)."""
        if self._tok is None:
            from nextx.latents import load_image_tokenizer
            from nextx.tokenizer import load_tokenizer

            self._tok = (load_tokenizer(self.cfg.text_tokenizer), load_image_tokenizer(self.cfg.image_tokenizer))
        return self._tok

    def __iter__(self) -> Iterator[Row]:
        info = torch.utils.data.get_worker_info()
        n_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotate) % n_workers
        reader = Reader(self.rank, self.world_size, worker, n_workers)
        text_tok, image_tok = self.tokenizers()
        special = SpecialIds.from_tokenizer(text_tok)
        cfg = self.cfg
        stats: dict = {}
        epoch, skip = self.start.get(reader.index, (0, 0))
        while True:
            # fresh per-epoch state: the position (epoch, rows yielded in it) alone determines what follows
            rng = random.Random((self.seed * 7_368_787 + reader.index) * 1_000_003 + epoch)
            packer = Packer(cfg.row_len, special.pad, cfg.pack_buffer)
            n, seen0, bad0 = 0, self._seen, self._n_bad
            for row in self._epoch_rows(epoch, reader, rng, packer, text_tok, image_tok, special, stats):
                n += 1
                if n <= skip:
                    continue
                row.position = (reader.index, epoch, n)
                yield _with_stats(row, stats)
            if n == 0:  # an epoch with nothing to train on would repeat forever
                raise DataError(
                    f"reader {reader.index} read a whole epoch of {len(self.paths)} shard(s) ({_names(self.paths)}) "
                    f"and packed no row: {self._seen - seen0} samples, {self._n_bad - bad0} bad, "
                    f"{packer.stats['too_long']} longer than data.row_len={cfg.row_len}; check the shards "
                    f"with `nextx data inspect DIR --validate`")
            skip = 0
            epoch += 1
            if not self.loop:
                break

    def _epoch_rows(self, epoch: int, reader: Reader, rng: random.Random, packer: Packer, text_tok, image_tok,
                    special: SpecialIds, stats: dict) -> Iterator[Row]:
        """Every packed row of one epoch of this reader, the last partial ones flushed at the end."""
        cfg = self.cfg
        shards, stride = shard_order(self.paths, reader, seed=self.seed, epoch=epoch,
                                     shuffle=cfg.shard_shuffle, resample=cfg.resample)
        for sample in shuffled(self._samples(shards, stride, reader, stats), cfg.shuffle_buffer, rng):
            try:
                segs = _laid_out(self._tokenized(sample, text_tok, image_tok), cfg.t2i_ratio, rng, stats)
                segs = cut_caption(segs, text_tok.word_starts, rate=cfg.caption_cut, rng=rng)
                if not segs:
                    raise BadSample(f"{sample['__key__']}: no text or image left after tokenization")
                J = cfg.image_pos_jitter
                gaps = [rng.randint(0, J) for seg in segs if isinstance(seg, ImageTokens)] if J else None
                layout = layout_document(segs, special, drop_trailing_clean=cfg.drop_trailing_clean,
                                         noise_copies=cfg.noise_copies, image_gaps=gaps)
            except BadSample as e:
                stats["bad_sample"] = stats.get("bad_sample", 0) + 1
                self._n_bad += 1  # `stats` is emptied into every row; this one counts for the log lines
                url = str(sample.get("__url__", "?"))
                self._bad_shards[url] = self._bad_shards.get(url, 0) + 1
                if self._n_bad <= 5 or self._n_bad % 1000 == 0:
                    log.warning("skipping bad sample (%d so far in this reader): %s", self._n_bad, e)
                self._check_bad()
                continue
            finally:
                self._seen += 1
            yield from packer.add(layout)
        yield from packer.flush()

    def _check_bad(self) -> None:
        cfg = self.cfg
        too_many = self._n_bad > cfg.max_bad_samples
        too_often = self._seen >= 50 and self._n_bad > cfg.max_bad_fraction * self._seen
        if too_many or too_often:
            worst = sorted(self._bad_shards.items(), key=lambda kv: -kv[1])[:5]
            raise DataError(
                f"{self._n_bad} bad samples of {self._seen} read (limits: data.max_bad_samples={cfg.max_bad_samples}, "
                f"data.max_bad_fraction={cfg.max_bad_fraction}), most in: "
                + ", ".join(f"{u} ({k})" for u, k in worst) + ". Check them with `nextx data inspect DIR --validate`")

    def _tokenized(self, sample: dict, text_tok, image_tok) -> tuple[list, bool, int]:
        """A raw sample -> (segments, is_pair, truncated texts), decoded and tokenized (`tokenize_document`), or
        with data.cache_docs from this reader's memory when it met the sample before; a BadSample is raised again
        each time, as it would be read again."""
        ck = (str(sample.get("__url__", "")), str(sample["__key__"]))
        hit = self._docs.get(ck) if self.cfg.cache_docs else None
        if hit is None:
            try:
                doc = decode_document(sample, load_pixels=self.cfg.use_latents == "pixels")
                segs, truncated = tokenize_document(doc, text_tok, image_tok, max_text_tokens=self.cfg.max_text_tokens,
                                                    use_latents=self.cfg.use_latents)
                hit = (segs, doc.is_pair(), truncated)
            except BadSample as e:
                hit = e
            if self.cfg.cache_docs:
                self._docs[ck] = hit
        if isinstance(hit, BadSample):
            raise hit
        return hit

    def _samples(self, shards: list[str], stride: int, reader: Reader, stats: dict) -> Iterator[dict]:
        i = 0
        for path in shards:
            keys = self._shard_keys.get(path)
            cached = keys is not None and all((path, k) in self._docs for k in keys)  # data.cache_docs: no tar read
            k, tar_stats, seen = 0, {}, []
            source = ({"__key__": key, "__url__": path} for key in keys) if cached else raw_samples(path, tar_stats)
            for sample in source:
                k += 1
                if self.cfg.cache_docs and not cached:
                    seen.append(str(sample["__key__"]))
                if stride == 1 or i % stride == reader.index:
                    yield sample
                i += 1
            if cached:
                continue
            if self.cfg.cache_docs and not tar_stats.get("bad_tar") and self._expected.get(path, k) == k:
                self._shard_keys[path] = seen
            unreadable = tar_stats.get("bad_tar", 0)
            if unreadable:
                stats["bad_tar"] = stats.get("bad_tar", 0) + unreadable
                self._n_bad += unreadable
                self._seen += unreadable
                self._bad_shards[path] = self._bad_shards.get(path, 0) + unreadable
                self._check_bad()
            want = self._expected.get(path)
            if want is not None and k != want:
                raise DataError(f"{path} holds {k} documents but its info.json records {want}: the shard was cut "
                                f"short (an interrupted copy?) or replaced; copy it again or rewrite the shard set")


def _names(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def _with_stats(row: Row, stats: dict) -> Row:
    """Move the pipeline counters accumulated since the last row into this row (they are summed downstream)."""
    row.stats.update(stats)
    stats.clear()
    return row


def _worker_init(_):
    import signal

    torch.set_num_threads(1)  # workers encode a few images each; oversubscribing 2 cores hurts the trainer
    # Ctrl-C and SLURM's SIGTERM reach every process: the trainer finishes its step, saves and stops, so its
    # workers must not die first. Ctrl-C is ignored (they exit with their parent); SIGTERM gives a grace period,
    # so that a terminate() by multiprocessing at exit still ends them in bounded time
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


WORKER_GRACE_S = 30.0


def _worker_sigterm(signum, frame):
    import os
    import threading

    t = threading.Timer(WORKER_GRACE_S, os._exit, args=(0,))
    t.daemon = True
    t.start()


@dataclass
class LoaderBatch(Batch):
    """A Batch as the DataLoader yields it: plus `position` (reader index, epoch, rows done) of its last row, kept
    by `to()`, and a `pin_memory()` the DataLoader's pinning thread calls (`to(non_blocking=True)` then overlaps the
    copy)."""

    position: tuple = (0, 0, 0)

    @classmethod
    def of(cls, b: Batch, position: tuple) -> "LoaderBatch":
        return cls(**{f.name: getattr(b, f.name) for f in fields(b)}, position=position)

    def pin_memory(self) -> "LoaderBatch":
        return replace(self, **{f.name: v.pin_memory() for f in fields(self)
                                if isinstance(v := getattr(self, f.name), torch.Tensor)})


def collate_rows(rows: list[Row], trim: int = 0) -> LoaderBatch:
    """collate (then `trim_pads` to a multiple of `trim` when trim > 0) + the read position of the batch's last row."""
    b = collate(rows)
    return LoaderBatch.of(trim_pads(b, trim) if trim else b, getattr(rows[-1], "position", (0, 0, 0)))


def build_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, shards: str | None = None,
                 split: str | None = None, loop: bool = True, num_workers: int | None = None,
                 start: dict | None = None, batches_done: int = 0, pin_memory: bool = False):
    """DataLoader yielding LoaderBatches of cfg.batch_rows packed rows for this rank.

    start / batches_done: resume from checkpointed reader positions after `batches_done` consumed batches (the
    DataLoader takes batches from its workers in turn, so the next one comes from worker batches_done % workers).
    """
    nw = cfg.num_workers if num_workers is None else num_workers
    from nextx.latents import load_image_tokenizer

    grid = load_image_tokenizer(cfg.image_tokenizer).grid
    check_packing(cfg, grid[0] * grid[1])
    ds = PackedRows(cfg, shards=shards, split=split, rank=rank, world_size=world_size, loop=loop, start=start,
                    rotate=batches_done % max(1, nw))
    collate_fn = functools.partial(collate_rows, trim=cfg.trim_multiple if cfg.trim_pads else 0)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_rows, collate_fn=collate_fn, num_workers=nw,
                                       worker_init_fn=_worker_init if nw else None, pin_memory=pin_memory,
                                       persistent_workers=nw > 0 and loop, drop_last=loop,
                                       prefetch_factor=4 if nw else None)

