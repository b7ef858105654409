"""Text data sets: exact encodings, the val split by document or position, tokenizers with an
end-of-text token, bpe:N training, bits per byte, and the presets from the command line."""

import json
import math

import numpy as np
import pytest
import tokenizers
from tokenizers import models
from transformers import AutoTokenizer, GPT2TokenizerFast

from conftest import SHARED_DATA, run_script
from gptlab import fast_encoding
from gptlab.corpus import Corpus
from gptlab.data import bits_per_byte, read_meta
from gptlab.errors import UserError
from gptlab.fast_encoding import BatchEncoder
from gptlab.tasks import text
from gptlab.tasks.text import DocumentSplit, prepare_corpus
from gptlab.tokenizer import Tokenizer

GPT2 = SHARED_DATA / "gpt2-tokenizer"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"


def shakespeare_documents() -> list[str]:
    """Tiny Shakespeare's speeches, plus texts that are hard to tokenize, as documents."""
    speeches = [s for s in SHAKESPEARE.read_text().split("\n\n") if s.strip()][:400]
    hard = [
        "  leading spaces, trailing spaces  \n\n\n",
        "ünïcödé — “quotes” 漢字 😀 \u00a0nbsp",
        "they're we'll I'd 1234567 3.14   \t\t tabs\r\nwindows",
        "a document that mentions <|endoftext|> in its text",
    ]
    return speeches + hard


def write_jsonl(path, documents):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return path


def test_token_files_are_each_documents_transformers_encoding_split_by_document(
    tmp_path, monkeypatch
):
    documents = shakespeare_documents()
    # One long document goes through the tokenizer in pieces: they must not change its tokens.
    documents.append("\n".join(documents[:40]))
    monkeypatch.setattr(text, "PIECE_CHARS", 500)
    source = write_jsonl(tmp_path / "docs.jsonl", documents)
    out = prepare_corpus(Corpus(str(source)), str(GPT2), tmp_path / "gpt2", val_fraction=0.2)
    theirs = GPT2TokenizerFast.from_pretrained(GPT2)
    expected = [theirs(d)["input_ids"] for d in documents]
    eos = 50256
    train = np.fromfile(out / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(out / "val.bin", dtype=np.uint16).tolist()
    meta = read_meta(out)
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(documents)
    assert meta["splits"] == {"train": len(train), "val": len(val)}
    # Rebuild both files from the expected encodings: every document in exactly one of them,
    # in corpus order, each followed by end-of-text.
    rebuilt = {"train": [], "val": []}
    remaining = {"train": train, "val": val}
    for ids in expected:
        for split in ("train", "val"):
            if remaining[split][: len(ids) + 1] == [*ids, eos]:
                rebuilt[split] += [*ids, eos]
                remaining[split] = remaining[split][len(ids) + 1 :]
                break
        else:
            raise AssertionError(f"a document is in neither file in order: {ids[:10]}")
    assert remaining == {"train": [], "val": []}
    assert (rebuilt["train"], rebuilt["val"]) == (train, val)
    assert 0.1 < meta["documents"]["val"] / len(documents) < 0.3
    # The byte counts behind bits per byte: the UTF-8 text of the documents.
    assert meta["bytes"]["train"] + meta["bytes"]["val"] == sum(len(d.encode()) for d in documents)


def test_fast_engines_encode_exactly_as_the_tokenizers_library(tmp_path):
    documents = shakespeare_documents()
    gpt2 = Tokenizer.load(GPT2)
    chars = Tokenizer.from_chars("".join(documents).replace("<|endoftext|>", ""))
    trained = Tokenizer.train_bpe(documents, 600)
    for tokenizer, engine in ((gpt2, "tiktoken"), (trained, "tiktoken"), (chars, "characters")):
        encoder = BatchEncoder(tokenizer)
        assert encoder.engine == engine
        fast = [list(map(int, ids)) for ids in encoder(documents)]
        assert fast == [tokenizer.encode(d) for d in documents]
        assert encoder.engine == engine  # the check on the first texts agreed
    assert fast_encoding.mergeable_ranks(chars) is None


def test_characters_outside_a_character_vocabulary_read_as_unknown_or_are_refused():
    # A classifier's vocabulary (prepare_data.py classify) has <|unk|>: another corpus prepared
    # with it (text --tokenizer) reads each unseen character as <|unk|>, as Tokenizer.encode does,
    # never as the vocabulary's neighbouring character.
    with_unknown = Tokenizer.from_chars("acegi", ("<|pad|>", "<|unk|>"))
    texts = ["abc", "ace<|endoftext|>bdf", "hij", "cage"]
    fast = [list(map(int, ids)) for ids in BatchEncoder(with_unknown)(texts)]
    assert fast == [with_unknown.encode(text) for text in texts]
    unknown = with_unknown.unknown_token_id
    assert fast[0] == [0, unknown, 1] and fast[2].count(unknown) == 2
    # Without <|unk|> such a text is refused, naming the characters.
    with pytest.raises(UserError, match="outside the vocabulary: 'b'"):
        BatchEncoder(Tokenizer.from_chars("acegi"))(["abc"])


def test_a_corpus_of_one_document_is_cut_by_position(tmp_path):
    out = prepare_corpus(Corpus(str(SHAKESPEARE)), "char", tmp_path / "sh", val_fraction=0.25)
    meta = read_meta(out)
    whole = SHAKESPEARE.read_text()
    cut = int(len(whole) * 0.75)
    tokenizer = Tokenizer.load(out)
    train = np.fromfile(out / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(out / "val.bin", dtype=np.uint16).tolist()
    assert tokenizer.decode(train) == whole[:cut]
    assert val[-1] == tokenizer.eos_token_id and tokenizer.decode(val[:-1]) == whole[cut:]
    assert meta["split_by"] == "position" and meta["bytes"] == {
        "train": cut,
        "val": len(whole) - cut,
    }


def test_the_document_split_is_seeded_and_keeps_documents_whole(tmp_path):
    documents = [f"document number {i}." for i in range(3000)]
    corpus = Corpus(str(write_jsonl(tmp_path / "many.jsonl", documents)))

    def val_documents(seed: int) -> set[str]:
        return {
            t
            for batch in DocumentSplit(0.1, seed).batches(corpus)
            for t, v in zip(batch.texts, batch.is_val)
            if v
        }

    first, again, other = val_documents(1), val_documents(1), val_documents(2)
    assert first == again and first != other
    assert 250 < len(first) < 350  # about val_fraction of the documents
    out = prepare_corpus(corpus, "char", tmp_path / "many", val_fraction=0.1, seed=1)
    tokenizer = Tokenizer.load(out)
    val_text = tokenizer.decode(np.fromfile(out / "val.bin", dtype=np.uint16).tolist())
    assert set(val_text.split("<|endoftext|>")[:-1]) == first
    assert read_meta(out)["documents"]["val"] == len(first)


def test_small_corpora_still_get_both_splits_or_a_clear_error(tmp_path):
    few = prepare_corpus(
        Corpus(str(SHARED_DATA / "tinystories" / "tinystories_sample.txt")),
        str(GPT2),
        tmp_path / "few",
        val_fraction=0.0005,  # no draw falls below it: the last document becomes val
    )
    assert read_meta(few)["documents"] == {"train": 4, "val": 1}
    single = write_jsonl(tmp_path / "single.jsonl", ["just one record"])
    with pytest.raises(UserError, match="single document"):
        prepare_corpus(Corpus(str(single)), "char", tmp_path / "single")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(UserError, match="is empty"):
        prepare_corpus(Corpus(str(empty)), str(GPT2), tmp_path / "empty")
    assert not (tmp_path / "single").exists() and not (tmp_path / "empty").exists()


def test_bpe_is_trained_on_the_train_split_only_and_transformers_sees_its_eos(tmp_path):
    # One document cut by position: a word that only the val part holds must not be learnt.
    train_text = SHAKESPEARE.read_text()[:200_000]
    val_text = "zyzzyva " * 4000
    source = tmp_path / "one.txt"
    source.write_text(train_text + val_text)
    fraction = len(val_text) / len(train_text + val_text)
    out = prepare_corpus(Corpus(str(source)), "bpe:300", tmp_path / "bpe", fraction)
    tokenizer = Tokenizer.load(out)
    vocab = tokenizer.backend.get_vocab()
    assert tokenizer.vocab_size == 300 and vocab["<|endoftext|>"] == 0
    assert "Ġthe" in vocab and not any("zyz" in token or "yva" in token for token in vocab)
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == 0
    assert theirs("the king's zyzzyva")["input_ids"] == tokenizer.encode("the king's zyzzyva")
    with pytest.raises(UserError, match="at least 257 tokens"):
        prepare_corpus(Corpus(str(source)), "bpe:100", tmp_path / "small")
    assert not (tmp_path / "small").exists()


def test_every_tokenizer_has_an_end_of_text_token_that_transformers_sees(tmp_path):
    chars = Tokenizer.from_chars("abc")
    assert chars.vocab_size == 4 and chars.eos_token_id == 3
    chars.save(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == 3
    assert theirs("cab<|endoftext|>")["input_ids"] == [2, 0, 1, 3]
    # A tokenizer without one (a directory or hub tokenizer) gets <|endoftext|> added after
    # its vocabulary when data is prepared with it.
    bare = Tokenizer(tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token=None)))
    assert bare.eos_token_id is None
    assert bare.with_end_of_text().eos_token_id == 2


def test_bits_per_byte_is_the_loss_per_byte_of_text(tmp_path):
    meta = {"splits": {"val": 300}, "bytes": {"val": 1200}}
    assert bits_per_byte(2.0, meta, "val") == pytest.approx(2.0 * 300 / 1200 / math.log(2))
    assert bits_per_byte(2.0, {"splits": {"val": 300}}, "val") is None


@pytest.mark.slow
def test_the_presets_from_the_command_line(tmp_path):
    sample = SHARED_DATA / "tinystories" / "tinystories_val.txt"
    run_script(
        "prepare_data.py",
        "tinystories",
        "--input",
        str(sample),
        "--tokenizer",
        "bpe:512",
        "--val_fraction",
        "0.1",
        "--out_dir",
        str(tmp_path / "stories"),
        cwd=tmp_path,
    )
    meta = read_meta(tmp_path / "stories")
    assert meta["split_by"] == "position" and meta["vocab_size"] == 512
    owt = write_jsonl(tmp_path / "owt.jsonl", shakespeare_documents())
    run_script(
        "prepare_data.py",
        "openwebtext",
        "--input",
        str(owt),
        "--tokenizer",
        str(GPT2),
        cwd=tmp_path,
    )
    meta = read_meta(tmp_path / "data" / "openwebtext")
    assert meta["vocab_size"] == 50257 and meta["split_by"] == "document"
    assert meta["val_fraction"] == 0.0005 and meta["documents"]["val"] >= 1
