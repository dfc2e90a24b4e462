"""Text tokenizer: fixed special ids, exact round trip, batch API, determinism, the three load paths (with the
specials they lack added), clear errors, and the training job end to end on tiny shards."""

import io
import json
import random
import runpy
import shutil
import tarfile
from pathlib import Path

import pytest

from nextx.errors import UserError
import sentencepiece as spm
import torch
from PIL import Image as PILImage

from nextx.documents import Document, Image, Text, write_shards
from nextx.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_sentencepiece

JOB = Path(__file__).resolve().parents[1] / "tokenizers" / "text" / "train_spm.py"
# Texts outside the caption grammar, so their characters are in the vocabulary and must round-trip exactly.
EXTRA = ["flag: Chad", "grinning face with big eyes", "café naïve 漢字 Ωμέγα", "digits 0123456789 and 42",
         "  two  spaces and a tab\there  ", "line one\nline two", "1 < 2 > 0",
         "the tag <boi> typed in text <eoi> <pad>"]  # the trainer ignores these names: "1 < 2" brings < and >


def captions(n: int, seed: int = 0) -> list[str]:
    """'a small red circle to the left of a blue square' and friends, from a tiny grammar."""
    rng = random.Random(seed)
    size, color = ["small", "large", "tiny"], ["red", "green", "blue", "yellow", "purple", "orange"]
    shape = ["circle", "square", "triangle", "star"]
    rel = ["to the left of", "to the right of", "above", "below", "next to"]

    def obj() -> str:
        return f"{rng.choice(size)} {rng.choice(color)} {rng.choice(shape)}"

    return [f"a {obj()} {rng.choice(rel)} a {obj()}" if rng.random() < 0.8 else f"{rng.randint(2, 5)} {obj()}s"
            for _ in range(n)]


CORPUS = captions(300) + EXTRA


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_sentencepiece(CORPUS, out, vocab_size=128, source="test grammar")
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def llama_sp(tmp_path_factory) -> Path:
    """A SentencePiece model with Llama's conventions (<unk>=0, <s>=1, </s>=2, no pad) trained here."""
    out = tmp_path_factory.mktemp("llama")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(out / "sp"), model_type="bpe",
                                   vocab_size=100, character_coverage=1.0, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    return out / "sp.model"


def test_special_ids_are_fixed(tok, tok_dir):
    assert SPECIAL_TOKENS == ("<pad>", "<unk>", "<bos>", "<eos>", "<boi>", "<eoi>")
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id) == (0, 1, 2, 3, 4, 5)
    assert tok.special_ids == set(range(6)) and tok.vocab_size == len(tok) == 128
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6)) and tok.token_to_id("nope~") is None
    manifest = json.loads((tok_dir / "tokenizer.json").read_text())
    assert manifest["kind"] == "sentencepiece" and manifest["vocab_size"] == 128
    assert manifest["special_tokens"] == dict(zip(SPECIAL_TOKENS, range(6)))
    assert manifest["n_texts"] == len(CORPUS) and manifest["source"] == "test grammar"


@pytest.mark.parametrize("text", CORPUS[:3] + EXTRA + ["", " ", "2 tiny blue stars"])
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(tok.encode(text, bos=True, eos=True))) == text  # specials dropped


def test_unseen_characters_become_unk_and_stay_visible(tok):
    ids = tok.encode("a red ☃ circle")
    assert tok.unk_id in ids and "⁇" in tok.decode(ids)


def test_ordinary_text_never_yields_pad_boi_eoi(tok):
    produced = {i for ids in tok.encode_batch(CORPUS + ["<boi>", "<eoi><pad><bos>", "x<boi>y"]) for i in ids}
    assert not produced & {tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id}


def test_batch_api_and_rendering_specials(tok):
    texts = CORPUS[:5]
    batch = tok.encode_batch(texts, bos=True, eos=True)
    assert batch == [tok.encode(t, bos=True, eos=True) for t in texts]
    assert all(ids[0] == tok.bos_id and ids[-1] == tok.eos_id for ids in batch)
    assert tok.decode_batch(batch) == texts
    padded = torch.full((2, 20), tok.pad_id)
    padded[0, :len(tok.encode("a red"))] = torch.tensor(tok.encode("a red"))
    assert tok.decode_batch(padded) == ["a red", ""]
    ids = [tok.bos_id] + tok.encode("a red circle") + [tok.boi_id, tok.eoi_id] + tok.encode("above") + [tok.eos_id]
    # each segment is encoded on its own, so each run renders without its dummy-prefix space
    assert tok.decode(ids, skip_special=False) == "<bos>a red circle<boi><eoi>above<eos>"
    assert tok.decode(ids) == "a red circle above"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match="decode_batch"):
        tok.decode(padded)


def _check_word_starts(t, texts):
    """Each whole-word prefix of a single-spaced text is the decode of the ids before one of its word starts."""
    for text in texts:
        words, ids = text.split(" "), t.encode(text)
        starts = t.word_starts(ids)
        assert starts[0] == 0 and len(starts) == len(words), (text, starts)
        assert [t.decode(ids[:j]) for j in starts[1:] + [len(ids)]] == [" ".join(words[:k])
                                                                        for k in range(1, len(words) + 1)]
    assert t.word_starts([]) == []


def test_word_starts_are_whole_word_prefixes(tok):
    _check_word_starts(tok, CORPUS[:50] + ["digits 0123456789 and 42", "café naïve 漢字 Ωμέγα", "grinning"])


def test_training_is_deterministic(tmp_path):
    a = train_sentencepiece(CORPUS, tmp_path / "a", vocab_size=96, seed=3)
    b = train_sentencepiece(iter(CORPUS), tmp_path / "b", vocab_size=96, seed=3)
    assert (tmp_path / "a/tokenizer.model").read_bytes() == (tmp_path / "b/tokenizer.model").read_bytes()
    assert a.encode_batch(CORPUS) == b.encode_batch(CORPUS)


def test_impossible_vocab_sizes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"too large .* at most \d+"):
        train_sentencepiece(CORPUS, tmp_path, vocab_size=5000)
    with pytest.raises(ValueError, match=r"too small: .* at least \d+"):
        train_sentencepiece(CORPUS, tmp_path, vocab_size=12)
    with pytest.raises(ValueError, match="no texts"):
        train_sentencepiece(["", ""], tmp_path, vocab_size=64)


def test_load_nextx_dir_and_its_bare_model_agree(tok, tok_dir, tmp_path):
    bare = load_tokenizer(tok_dir / "tokenizer.model")  # (b): our own model file alone carries every special
    only_model = tmp_path / "only"
    only_model.mkdir()
    shutil.copy(tok_dir / "tokenizer.model", only_model)
    for other in (bare, load_tokenizer(only_model)):
        assert other.special_tokens == tok.special_tokens and other.vocab_size == tok.vocab_size
        assert other.encode_batch(CORPUS) == tok.encode_batch(CORPUS)


def test_load_nextx_dir_rejects_a_swapped_model(tok_dir, llama_sp, tmp_path):
    bad = tmp_path / "swapped"
    shutil.copytree(tok_dir, bad)
    shutil.copy(llama_sp, bad / "tokenizer.model")
    with pytest.raises(ValueError, match="does not match"):
        load_tokenizer(bad)


def test_load_bare_llama_style_model_adds_missing_specials(llama_sp):
    t = load_tokenizer(llama_sp)
    assert (t.unk_id, t.bos_id, t.eos_id) == (0, 1, 2)  # <unk>, <s>, </s> reused
    assert (t.pad_id, t.boi_id, t.eoi_id) == (100, 101, 102) and t.vocab_size == 103  # appended, in order
    assert t.token_to_id("<s>") == 1 and t.token_to_id("<eoi>") == 102
    produced = {i for ids in t.encode_batch(CORPUS) for i in ids}
    assert max(produced) < 100 and t.bos_id not in produced
    ids = [t.bos_id] + t.encode("a red circle") + [t.boi_id, t.eoi_id, t.eos_id, t.pad_id]
    assert t.decode(ids) == "a red circle"
    assert t.decode(ids, skip_special=False) == "<s>a red circle<boi><eoi></s><pad>"


def test_load_hf_bpe_dir_adds_specials_with_stable_ids(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]").save_pretrained(tmp_path / "hf")
    n = bpe.get_vocab_size()
    t = load_tokenizer(tmp_path / "hf")
    assert t.pad_id == bpe.token_to_id("[PAD]")  # reused, not added
    assert [t.unk_id, t.bos_id, t.eos_id, t.boi_id, t.eoi_id] == list(range(n, n + 5))  # appended in order
    assert t.vocab_size == n + 5 and t.token_to_id("<boi>") == t.boi_id
    again = load_tokenizer(tmp_path / "hf")
    assert again.special_tokens == t.special_tokens and again.encode_batch(CORPUS) == t.encode_batch(CORPUS)
    for text in CORPUS[:3] + EXTRA:
        ids = t.encode(text, bos=True, eos=True)
        assert t.decode(ids) == text and not set(ids[1:-1]) & t.special_ids
    _check_word_starts(t, CORPUS[:50])  # byte-level BPE marks a word start with "\u0120", not "\u2581"


def test_load_hf_llama_dir_matches_the_bare_model(llama_sp, tmp_path):
    src = tmp_path / "llama_src"  # what a Llama checkpoint ships: tokenizer.model + tokenizer_config.json
    src.mkdir()
    shutil.copy(llama_sp, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    hf = load_tokenizer(src)
    bare = load_tokenizer(llama_sp)
    assert hf.special_tokens == bare.special_tokens and hf.vocab_size == bare.vocab_size == 103
    # transformers' Llama conversion adds no dummy prefix before leading spaces (sentencepiece does): skip those
    texts = [t for t in CORPUS if not t[0].isspace()]
    assert hf.encode_batch(texts) == bare.encode_batch(texts)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(tmp_path / "saved")  # tokenizer.json
    saved = load_tokenizer(tmp_path / "saved")
    assert saved.special_tokens == hf.special_tokens and saved.encode_batch(CORPUS) == hf.encode_batch(CORPUS)


def test_bad_paths_name_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text tokenizer"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="looked for"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")


def _png_doc(key: str, text: str) -> Document:
    return Document(key, [Text(text), Image(pixels=PILImage.new("RGB", (8, 8), (200, 10, 10)))])


def test_job_end_to_end_on_shards(tmp_path, capsys):
    main = runpy.run_path(str(JOB), run_name="nextx_job")["main"]  # how `nextx tokenizer text` runs it
    caps = captions(200, seed=1)
    write_shards([_png_doc(f"d{i}", c) for i, c in enumerate(caps)], tmp_path / "shards", max_per_shard=64,
                 progress=False)
    write_shards([_png_doc("h0", "heldout words zebra quokka")], tmp_path / "shards", split="heldout",
                 progress=False)
    with tarfile.open(tmp_path / "shards" / "train-000099.tar", "w") as tf:  # bad json, a missing image member
        for name, payload in [("x1.json", b"{not json"), ("x2.json", b'{"segments": [{"image": "img0"}]}')]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    out = tmp_path / "tok"
    assert main(["--shards", str(tmp_path / "shards"), "--out", str(out), "--vocab-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "texts 200 (200 documents, skipped 2 bad samples" in printed and "unk fraction 0.00e+00" in printed
    t = load_tokenizer(out)
    assert json.loads((out / "tokenizer.json").read_text())["n_texts"] == 200
    assert t.vocab_size == 64 and t.decode(t.encode(caps[0])) == caps[0]
    assert t.unk_id in t.encode("zebra")  # the heldout split was not read

    with pytest.raises(UserError, match="already holds a tokenizer .*--force"):   # never replaced silently
        main(["--shards", str(tmp_path / "shards"), "--out", str(out), "--max-texts", "50", "--vocab-size", "64"])
    assert main(["--shards", str(tmp_path / "shards"), "--out", str(out), "--max-texts", "50", "--vocab-size",
                 "9999", "--force"]) == 2
    assert "at most" in capsys.readouterr().err
    (tmp_path / "lines.txt").write_text("\n".join(caps) + "\n\n")
    assert main(["--text-file", str(tmp_path / "lines.txt"), "--out", str(tmp_path / "tok2"), "--vocab-size",
                 "64", "--max-texts", "100"]) == 0
    assert json.loads((tmp_path / "tok2/tokenizer.json").read_text())["n_texts"] == 100
    # both sources: the shards' texts plus the file's lines (a shapes shard dir's language.txt spells every word)
    (tmp_path / "extra.txt").write_text("heldout words zebra quokka\n")
    assert main(["--shards", str(tmp_path / "shards"), "--text-file", str(tmp_path / "extra.txt"), "--out",
                 str(tmp_path / "tok3"), "--vocab-size", "64"]) == 0
    assert "texts 201 (200 documents" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "tok3").unk_id not in load_tokenizer(tmp_path / "tok3").encode("zebra quokka")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "tok4")])                                  # no source at all
