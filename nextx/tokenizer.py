"""The text tokenizer: SentencePiece BPE trained by the project, or an existing SentencePiece / Hugging Face one.

    SPECIAL_TOKENS        <pad> <unk> <bos> <eos> <boi> <eoi>, the ids the sequence layout needs (docs/design.md §1)
    train_sentencepiece   texts -> out_dir/{tokenizer.model, tokenizer.json} and the loaded TextTokenizer
    TextTokenizer         encode/decode (single and batch), special ids, vocab_size for sizing the embedding
    load_tokenizer        a nextx tokenizer dir, a bare SentencePiece .model, or a local Hugging Face tokenizer dir

Training choices (Llama's SentencePiece settings, minus byte fallback by default):
- Specials at fixed ids: pad=0, unk=1, bos=2, eos=3, boi=4, eoi=5. boi/eoi are CONTROL symbols, not
  user-defined ones: a user-defined symbol is matched inside input text, so a caption containing the string
  "<boi>" would encode to the image token and start a drawing. A control symbol is a real id the model can
  predict and the data pipeline can insert, but `encode` of any text never produces it.
- Normalisation "identity" and remove_extra_whitespaces=False: decode(encode(s)) == s exactly, runs of spaces,
  tabs and newlines included. The default nmt_nfkc rule would fold "２" into "2" and collapse spaces, so
  generated text could never contain what the training text contained.
- split_digits: numbers are spelled digit by digit (counting and coordinates stay compositional).
- character_coverage=1.0: every character of the training texts gets a piece. A character never seen in
  training encodes to <unk> unless byte_fallback=True, which spends 256 ids on raw bytes so nothing is ever
  unknown; worth it at vocab sizes in the thousands, impossible at the 64-256 of the small built-in data.
- The trainer ignores the special names where they occur in training text ("<boi>" adds neither "<" nor
  "boi"); typed in text later, such a name is encoded piece by piece like any other string.
- decode(skip_special=True) drops every special id except <unk>: <unk> stands for real text that could not be
  represented, and silently deleting it would hide the loss.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<boi>", "<eoi>")
ROLES = tuple(name.strip("<>") for name in SPECIAL_TOKENS)  # "pad", "unk", ...: attribute stems
MODEL_FILE, MANIFEST_FILE = "tokenizer.model", "tokenizer.json"
MAX_SENTENCE_BYTES = 1 << 30  # sentencepiece silently skips longer texts (default 4192 bytes); never do that


class TextTokenizer:
    """Text <-> ids over a SentencePiece processor (`sp`) or a Hugging Face tokenizer (`hf`).

    Build it with `load_tokenizer` or `train_sentencepiece`. `vocab_size` counts every id this wrapper can
    return, including specials it added, so `nn.Embedding(tok.vocab_size, D)` covers them all.
    """

    def __init__(self, *, sp: spm.SentencePieceProcessor | None = None, hf=None, ids: dict[str, int],
                 names: dict[int, str], vocab_size: int, source: str):
        if (sp is None) == (hf is None):
            raise ValueError("TextTokenizer needs exactly one of sp or hf")
        self._sp, self._hf, self._ids, self._names = sp, hf, ids, names
        self.vocab_size, self.source = vocab_size, source
        drop = set(names) | (set(hf.all_special_ids) if hf is not None else set())
        self._drop = drop - {ids["unk"]}  # see the module docstring: <unk> is kept on decode

    @classmethod
    def from_sentencepiece(cls, sp: spm.SentencePieceProcessor, source: str) -> "TextTokenizer":
        """Map roles on a SentencePiece model: its own pad/unk/bos/eos ids (Llama: <unk>=0, <s>=1, </s>=2),
        else a piece named like ours (<boi>), else a new id sp.vocab_size() + k, k counting the added ones
        in SPECIAL_TOKENS order. Added ids live only in this wrapper: encode never yields them."""
        own = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
        ids: dict[str, int] = {}
        names: dict[int, str] = {}
        n = sp.vocab_size()
        for role, name in zip(ROLES, SPECIAL_TOKENS):
            i = own.get(role, -1)
            if i < 0:
                j = sp.piece_to_id(name)  # unknown pieces map to unk, hence the check by name
                i = j if sp.id_to_piece(j) == name else -1
            if i < 0:
                i, n = n, n + 1
            ids[role] = i
            names[i] = name if i >= sp.vocab_size() else sp.id_to_piece(i)
        return cls(sp=sp, ids=ids, names=names, vocab_size=n, source=source)

    @classmethod
    def from_hf(cls, hf, source: str) -> "TextTokenizer":
        """Map roles on a Hugging Face tokenizer (modified in place): its own pad/unk/bos/eos tokens (Llama:
        <unk>, <s>, </s>), else ours, added with `add_special_tokens` (an id already holding that string is
        reused, otherwise the id is appended at len(hf)); <boi>/<eoi> are reused by name or added as special
        tokens. The additions happen in SPECIAL_TOKENS order, so the ids are the same at every load."""
        tokens: dict[str, str] = {}
        for role, name in zip(ROLES, SPECIAL_TOKENS):
            own = getattr(hf, f"{role}_token", None)  # no boi_token attribute on most tokenizers
            if isinstance(own, str):
                tokens[role] = own
                continue
            if role in ("pad", "unk", "bos", "eos"):
                hf.add_special_tokens({f"{role}_token": name})
            elif name not in hf.get_vocab():
                hf.add_tokens([name], special_tokens=True)
            tokens[role] = name
        ids = {role: hf.convert_tokens_to_ids(t) for role, t in tokens.items()}
        return cls(hf=hf, ids=ids, names={ids[r]: tokens[r] for r in ROLES}, vocab_size=len(hf), source=source)

    # --- ids ------------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def boi_id(self) -> int:
        return self._ids["boi"]

    @property
    def eoi_id(self) -> int:
        return self._ids["eoi"]

    @property
    def special_ids(self) -> set[int]:
        return set(self._ids.values())

    @property
    def special_tokens(self) -> dict[str, int]:
        """Our names (SPECIAL_TOKENS order) -> ids, whatever the backend calls them (Llama: "<bos>" -> <s>)."""
        return {name: self._ids[role] for role, name in zip(ROLES, SPECIAL_TOKENS)}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        kind = "sentencepiece" if self._sp is not None else type(self._hf).__name__
        return f"TextTokenizer({kind}, vocab_size={self.vocab_size}, {self._ids}, source={self.source!r})"

    def token_to_id(self, token: str) -> int | None:
        """Id of a piece/token string (specials by the name this tokenizer gives them), None if unknown."""
        for i, name in self._names.items():
            if name == token:
                return i
        if self._sp is not None:
            i = self._sp.piece_to_id(token)
            return i if self._sp.id_to_piece(i) == token else None
        return self._hf.get_vocab().get(token)

    # --- encode / decode ------------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids, optionally framed by <bos>/<eos>. Never yields <pad>, <boi> or <eoi>."""
        if self._sp is not None:  # not encode_batch([text]): the batch path starts threads (~20x slower)
            ids = self._sp.encode(text)
        else:  # split_special_tokens: "<boi>" typed in a text stays text, as with sentencepiece controls
            ids = self._hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Texts -> one id list each, through the backends' native (multi-threaded) batch paths."""
        texts = list(texts)
        if not texts:
            return []
        if self._sp is not None:
            out = self._sp.encode(texts)
        else:
            out = self._hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in out]

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """Ids (list, or a 1-D tensor/array) -> text. skip_special drops special ids except <unk>; otherwise
        they are rendered by name. Nothing stops decoding early: an <eos> in the middle is dropped/rendered."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if not all(isinstance(i, int) for i in ids):
            raise TypeError("decode takes a 1-D sequence of int ids; use decode_batch for a batch")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if skip_special:
            ids = [i for i in ids if i not in self._drop]
        if self._hf is not None:  # hf renders its own and added specials by name
            return self._hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        parts: list[str] = []
        run: list[int] = []
        for i in ids + [-1]:  # -1 flushes the last run
            if (i >= 0 and i not in self._names) or i == self.unk_id:
                run.append(i)
                continue
            if run:  # each run drops its leading "▁": text segments are encoded one by one, each with its own
                parts.append(self._sp.decode(run))  # dummy-prefix space (the same as a run after <bos>)
                run = []
            if i >= 0:
                parts.append(self._names[i])
        return "".join(parts)

    def word_starts(self, ids: Sequence[int]) -> list[int]:
        """Indices of the tokens of `ids` (one text's ids, no specials) that begin a whitespace-separated word: 0,
        then every j whose text, decoded after ids[:j], starts with whitespace. By decoding, so it holds for any
        backend (SentencePiece's "▁", byte-level BPE's "Ġ", WordPiece's "##" alike). ids[:j] for each returned
        j > 0 is then a whole-word prefix of the text."""
        ids = list(ids)
        if not ids:
            return []
        starts, prev = [0], self.decode(ids[:1])
        for j in range(2, len(ids) + 1):
            cur = self.decode(ids[:j])
            if cur.startswith(prev) and cur[len(prev):len(prev) + 1].isspace():
                starts.append(j - 1)
            prev = cur
        return starts

    def decode_batch(self, batch, *, skip_special: bool = True) -> list[str]:
        """A list of id lists, or a 2-D tensor/array -> one text per row."""
        return [self.decode(ids, skip_special=skip_special) for ids in batch]


def train_sentencepiece(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int,
                        model_type: str = "bpe", character_coverage: float = 1.0, seed: int = 0,
                        byte_fallback: bool = False, source: str = "") -> TextTokenizer:
    """Train SentencePiece in-process on `texts` (empty strings skipped) and save it in `out_dir`.

    Writes tokenizer.model and the tokenizer.json manifest (kind, vocab_size, special ids, n_texts, source,
    trainer settings). Deterministic for the same texts, settings and seed. Raises ValueError when vocab_size
    does not fit the data, naming the bound sentencepiece allows.
    """
    counted = {"n": 0}

    def sentences():
        for t in texts:
            if t:
                counted["n"] += 1
                yield t

    settings = dict(model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
                    byte_fallback=byte_fallback, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, split_digits=True)
    spm.set_random_generator_seed(seed)  # sampling/shuffling inside the trainer draws from this generator
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, **settings,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=SPECIAL_TOKENS[0], unk_piece=SPECIAL_TOKENS[1],
            bos_piece=SPECIAL_TOKENS[2], eos_piece=SPECIAL_TOKENS[3], control_symbols=list(SPECIAL_TOKENS[4:]),
            max_sentence_length=MAX_SENTENCE_BYTES, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(_explain(str(e), vocab_size, counted["n"])) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(model.getvalue())
    tok = TextTokenizer.from_sentencepiece(spm.SentencePieceProcessor(model_proto=model.getvalue()), str(out))
    manifest = {"kind": "sentencepiece", "model_file": MODEL_FILE, "vocab_size": tok.vocab_size,
                "special_tokens": tok.special_tokens,
                "n_texts": counted["n"], "source": source, "trainer": {**settings, "seed": seed}}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return tok


def _explain(msg: str, vocab_size: int, n_texts: int) -> str:
    """sentencepiece's INTERNAL check failures -> a message that says what to change."""
    if n_texts == 0:
        return "no texts to train the tokenizer on"
    if m := re.search(r"value <= (\d+)", msg):
        return (f"vocab_size={vocab_size} is too large for these {n_texts} texts: sentencepiece allows at most "
                f"{m.group(1)} here (more text raises the bound)")
    if m := re.search(r"required_chars\. \d+ vs (\d+)", msg):
        return (f"vocab_size={vocab_size} is too small: these {n_texts} texts need at least {m.group(1)} ids "
                f"(their characters plus the special tokens); lower character_coverage or raise vocab_size")
    return f"sentencepiece training failed: {msg}"


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load a text tokenizer from local disk (never a hub). `path` is one of

    (a) a nextx dir (tokenizer.json manifest with kind "sentencepiece" + tokenizer.model): ids are checked
        against the manifest;
    (b) a bare SentencePiece .model file, or a dir holding only tokenizer.model (e.g. Llama's);
    (c) a Hugging Face tokenizer dir (tokenizer_config.json and/or tokenizer.json), via AutoTokenizer.

    Special-token rule for (b) and (c), role by role in SPECIAL_TOKENS order: the tokenizer's own token for the
    role is reused (Llama: <unk>, <s> as bos, </s> as eos), else a token spelled like ours, else ours is added
    after the last id (Hugging Face: add_special_tokens/add_tokens; bare SentencePiece: ids sp.vocab_size() + k
    kept in the wrapper). Llama thus gains <pad>, <boi>, <eoi> at n, n+1, n+2, and `vocab_size` is n + 3.
    """
    p = Path(path)
    if p.is_file():
        return TextTokenizer.from_sentencepiece(_load_sp(p), str(p))
    if not p.is_dir():
        raise FileNotFoundError(f"no text tokenizer at {p}: expected a directory or a SentencePiece .model file")
    manifest = _manifest(p / MANIFEST_FILE)
    if manifest is not None:
        tok = TextTokenizer.from_sentencepiece(_load_sp(p / manifest.get("model_file", MODEL_FILE)), str(p))
        got = tok.special_tokens
        if got != manifest.get("special_tokens") or tok.vocab_size != manifest.get("vocab_size"):
            raise ValueError(f"{p}: {MODEL_FILE} does not match {MANIFEST_FILE} (special ids {got}, vocab_size "
                             f"{tok.vocab_size}); was one of the two files replaced?")
        return tok
    if (p / "tokenizer_config.json").is_file() or (p / MANIFEST_FILE).is_file():
        from transformers import AutoTokenizer

        return TextTokenizer.from_hf(AutoTokenizer.from_pretrained(str(p), local_files_only=True), str(p))
    if (p / MODEL_FILE).is_file():
        return TextTokenizer.from_sentencepiece(_load_sp(p / MODEL_FILE), str(p))
    raise FileNotFoundError(f"no text tokenizer in {p}: looked for a nextx {MANIFEST_FILE} + {MODEL_FILE}, a Hugging "
                            f"Face tokenizer_config.json / tokenizer.json, or a SentencePiece {MODEL_FILE}")


def _manifest(path: Path) -> dict | None:
    """The nextx manifest at `path`, or None when absent or when it is a Hugging Face tokenizer.json."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("kind") == "sentencepiece" else None


def _load_sp(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model {path} not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path} is not a SentencePiece model ({e})") from None
