"""Corpus readers: every file type through `datasets`, directories and globs, bad input."""

import json

import pandas as pd
import pytest

from conftest import SHARED_DATA, run_script
from gptlab.corpus import Corpus, count_characters, has_separator_line
from gptlab.errors import UserError

DOCUMENTS = [
    "Once upon a time, there was a cat.\nThe cat sat.",
    'She said, "Hello, world!"\n\nThen, commas, quotes and\nnew lines.',
    "ünïcödé — “quotes” 漢字 😀",
    "Numbers 12,345 and\ttabs.",
]


def write_all_formats(directory):
    """The same documents as .txt (separated), .jsonl, .json, .parquet and .csv files."""
    directory.mkdir(parents=True, exist_ok=True)
    separated = "".join(f"{doc}\n<|endoftext|>\n" for doc in DOCUMENTS)
    (directory / "a.txt").write_text("\n" + separated, encoding="utf-8")
    rows = [{"text": doc, "label": i} for i, doc in enumerate(DOCUMENTS)]
    (directory / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "c.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(directory / "d.parquet")
    pd.DataFrame(rows).to_csv(directory / "e.csv", index=False)
    return directory


def test_each_file_type_reads_its_documents_in_order(tmp_path):
    directory = write_all_formats(tmp_path / "corpus")
    for name in ("a.txt", "b.jsonl", "c.json", "d.parquet", "e.csv"):
        assert list(Corpus(str(directory / name)).texts()) == DOCUMENTS, name
    # A directory and a glob: every file, sorted by path.
    assert list(Corpus(str(directory)).texts()) == DOCUMENTS * 5
    assert list(Corpus(str(directory / "*.json*")).texts()) == DOCUMENTS * 2


def test_records_keep_every_column_for_other_data_sets(tmp_path):
    directory = write_all_formats(tmp_path / "corpus")
    records = list(Corpus(str(directory / "e.csv")).records())
    assert records == [{"text": d, "label": i} for i, d in enumerate(DOCUMENTS)]
    reviews = Corpus(str(SHARED_DATA / "chnsenticorp" / "ChnSentiCorp_htl_all.csv"), "review")
    first = next(reviews.records())
    assert set(first) == {"label", "review"} and first["label"] == 1
    # Quoted commas and new lines are one review each; the one empty review is left out.
    assert sum(1 for _ in reviews.texts()) == 7766 - 1


def test_the_tinystories_text_format(tmp_path):
    sample = Corpus(str(SHARED_DATA / "tinystories" / "tinystories_sample.txt"))
    stories = list(sample.texts())
    assert len(stories) == 5 and stories[0].startswith("Once upon a time there was a little boy")
    assert all(story == story.strip() and "<|endoftext|>" not in story for story in stories)
    assert sample.single_document() is None
    # Without a separator line, a file is one document, taken as it is.
    plain = tmp_path / "plain.txt"
    plain.write_text("  First line.\n\nSecond <|endoftext|> inline.\n")
    assert list(Corpus(str(plain)).texts()) == [plain.read_text()]
    assert Corpus(str(plain)).single_document() == plain
    assert not has_separator_line(plain)


def test_characters_are_counted_as_python_reads_them(tmp_path):
    path = tmp_path / "crlf.txt"
    text = "ab\r\nçé😀\r\nlast"
    path.write_bytes(text.encode("utf-8"))
    assert count_characters(path) == len("".join(Corpus(str(path)).lines())) == len(text) - 2
    for block in (1, 2, 3, 5):  # a \r\n or a character cut between blocks counts once
        assert count_characters(path, block_bytes=block) == len(text) - 2


def test_bad_sources_are_named_with_the_fix(tmp_path):
    directory = write_all_formats(tmp_path / "corpus")
    with pytest.raises(UserError, match="not found"):
        Corpus(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="no files match"):
        Corpus(str(tmp_path / "*.xml"))
    (tmp_path / "notes.md").write_text("# notes")
    with pytest.raises(UserError, match=r"notes.md is not a corpus file; use \.txt"):
        Corpus(str(tmp_path / "notes.md"))
    with pytest.raises(UserError, match="no column 'body'.*columns are: text, label"):
        list(Corpus(str(directory / "b.jsonl"), text_column="body").texts())
    with pytest.raises(UserError, match="holds int values, not text"):
        list(Corpus(str(directory / "b.jsonl"), text_column="label").texts())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(UserError, match="could not read .*broken.jsonl as json"):
        list(Corpus(str(broken)).texts())
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        list(Corpus(str(latin1)).lines())


def test_a_hub_data_set_offline_says_the_network_is_needed(tmp_path):
    result = run_script(
        "prepare_data.py",
        "text",
        "--input",
        "hf:roneneldan/TinyStories",
        "--tokenizer",
        str(SHARED_DATA / "gpt2-tokenizer"),
        "--out_dir",
        str(tmp_path / "out"),
        cwd=tmp_path,
        check=False,
        env={"HF_HUB_OFFLINE": "1"},
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "hf:roneneldan/TinyStories" in lines[0] and "network" in lines[0]
    assert "--input" in lines[0]
    assert not (tmp_path / "out").exists()
