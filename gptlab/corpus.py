"""Corpora read through `datasets`, streamed so that any size reads in bounded memory.

    Corpus("stories.txt")                          documents separated by <|endoftext|> lines
    Corpus("shards/", text_column="content")        every .txt/.jsonl/.json/.parquet/.csv file in it
    Corpus("data/*.jsonl")                         a glob
    Corpus("hf:roneneldan/TinyStories", split="train")   a Hugging Face data set (needs the network)

`records()` yields each record as a dict of its columns (a .txt document is {"text": ...}),
`texts()` the documents of the text column, always in the same order (local files sorted by
path), so data sets that read labelled rows or conversations can reuse it.
"""

import glob
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptlab.errors import UserError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""The file types a corpus may hold, and the `datasets` builder that reads each."""
HUB_PREFIX = "hf:"
SEPARATOR = "<|endoftext|>"
"""A line holding only this separates two documents of a .txt file (TinyStories' format)."""
BATCH_ROWS = 1000


def resolve_files(source: str) -> list[Path]:
    """The files of a local source: a file, a directory (searched recursively) or a glob."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise UserError(f"{source} holds no {', '.join(BUILDERS)} files")
    elif glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"no files match {source}")
    else:
        raise UserError(f"input {source} not found; give a file, a directory, a glob or hf:NAME")
    for file in files:
        if file.suffix not in BUILDERS:
            raise UserError(
                f"{file} is not a corpus file; use {', '.join(BUILDERS)} files (or hf:NAME)"
            )
    return files


@dataclass
class Corpus:
    source: str
    """A local file, directory or glob, or hf:NAME for a Hugging Face data set."""
    text_column: str = "text"
    """The column that holds the documents (a .txt file's documents are its `text` column)."""
    config_name: str | None = None
    """hf: sources: the data set's configuration (subset)."""
    split: str = "train"
    """hf: sources: the split to read."""
    files: list[Path] = field(init=False)

    def __post_init__(self):
        if self.is_hub and not self.source[len(HUB_PREFIX) :]:
            raise UserError("--input hf: needs a data set name, such as hf:roneneldan/TinyStories")
        if not self.is_hub and (self.config_name or self.split != "train"):
            raise UserError("--config_name and --split choose part of an hf: data set only")
        self.files = [] if self.is_hub else resolve_files(self.source)

    @property
    def is_hub(self) -> bool:
        return self.source.startswith(HUB_PREFIX)

    def describe(self) -> str:
        if self.is_hub:
            options = f", config {self.config_name}" if self.config_name else ""
            return f"{self.source} (split {self.split}{options})"
        return (
            str(self.files[0])
            if len(self.files) == 1
            else f"{self.source} ({len(self.files)} files)"
        )

    def records(self) -> Iterator[dict]:
        """Every record, as {column: value}."""
        for batch in self._batches():
            columns = list(batch)
            for values in zip(*batch.values()):
                yield dict(zip(columns, values))

    def texts(self) -> Iterator[str]:
        """The documents, in order; empty ones are left out."""
        for batch in self.text_batches():
            yield from batch

    def text_batches(self) -> Iterator[list[str]]:
        """The documents in lists of up to BATCH_ROWS (fewer Python calls per document)."""
        for batch in self._batches():
            yield self._text_column(batch)

    def single_document(self) -> Path | None:
        """The corpus's one .txt file if it is all one document (no separator line), else None."""
        if len(self.files) == 1 and self.files[0].suffix == ".txt":
            return None if has_separator_line(self.files[0]) else self.files[0]
        return None

    def lines(self) -> Iterator[str]:
        """The lines of a single-.txt-file corpus, line ends kept (universal newlines)."""
        (file,) = self.files
        for batch in _read_local("text", [file], keep_linebreaks=True):
            yield from batch["text"]

    # -- reading ------------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, list]]:
        if self.is_hub:
            yield from _read_hub(self.source[len(HUB_PREFIX) :], self.config_name, self.split)
            return
        for builder, group in _runs_of_same_builder(self.files):
            if builder == "text":  # one file at a time: a file's end also ends a document
                for file in group:
                    yield from _txt_documents(file)
            else:
                yield from _read_local(builder, group)

    def _text_column(self, batch: dict[str, list]) -> list[str]:
        if self.text_column not in batch:
            raise UserError(
                f"no column {self.text_column!r} in {self.describe()}; its columns are: "
                f"{', '.join(batch)} (choose one with --text_column)"
            )
        texts = [t for t in batch[self.text_column] if t is not None and t != ""]
        if texts and not all(isinstance(t, str) for t in texts[:1]):
            raise UserError(
                f"column {self.text_column!r} of {self.describe()} holds "
                f"{type(texts[0]).__name__} values, not text; choose the text column with "
                "--text_column"
            )
        return texts


def _runs_of_same_builder(files: list[Path]) -> Iterator[tuple[str, list[Path]]]:
    """Consecutive files read by the same builder, grouped (files keep their order)."""
    run: list[Path] = []
    for file in files:
        if run and BUILDERS[file.suffix] != BUILDERS[run[-1].suffix]:
            yield BUILDERS[run[-1].suffix], run
            run = []
        run.append(file)
    if run:
        yield BUILDERS[run[-1].suffix], run


def _read_local(builder: str, files: list[Path], **options) -> Iterator[dict[str, list]]:
    import datasets

    names = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
    try:
        stream = datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            streaming=True,
            **options,
        )
        yield from stream.iter(batch_size=BATCH_ROWS)
    except UnicodeDecodeError as error:
        raise UserError(
            f"{names} is not UTF-8 text (byte {error.start}: {error.reason}); convert it to UTF-8"
        ) from None
    except UserError:
        raise
    except Exception as error:  # pyarrow, json and csv parsers each raise their own types
        raise UserError(f"could not read {names} as {builder}: {_first_line(error)}") from None


def _read_hub(name: str, config_name: str | None, split: str) -> Iterator[dict[str, list]]:
    import datasets

    try:
        stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
        yield from stream.iter(batch_size=BATCH_ROWS)
    except UserError:
        raise
    except (ConnectionError, TimeoutError) as error:
        raise UserError(
            f"could not reach hf:{name} on the Hugging Face Hub ({_first_line(error)}); this "
            "needs the network: connect, or download the files and pass them with --input"
        ) from None
    except Exception as error:
        raise UserError(f"could not read hf:{name}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()


def _is_separator(line: str) -> bool:
    return line.strip() == SEPARATOR


def _txt_documents(file: Path) -> Iterator[dict[str, list]]:
    """The documents of a .txt file: the text between separator lines, stripped of surrounding
    whitespace as TinyStories' export writes them (empty ones left out); a file without a
    separator line is one document, taken as it is."""
    documents: list[str] = []
    lines: list[str] = []
    separated = False
    for batch in _read_local("text", [file], keep_linebreaks=True):
        for line in batch["text"]:
            if _is_separator(line):
                separated = True
                documents.append("".join(lines).strip())
                lines = []
            else:
                lines.append(line)
        if len(documents) >= BATCH_ROWS:
            yield {"text": [d for d in documents if d]}
            documents = []
    if lines:
        text = "".join(lines)
        documents.append(text.strip() if separated else text)
    documents = [d for d in documents if d]
    if documents:
        yield {"text": documents}


SEPARATOR_LINE = re.compile(rb"^[^\n]*" + re.escape(SEPARATOR.encode()) + rb"[^\n]*$", re.M)


def has_separator_line(file: Path, block_bytes: int = 1 << 24) -> bool:
    """Whether a .txt file has a document separator line (a fast scan of its bytes)."""
    tail = b""
    with open(file, "rb") as stream:
        while block := stream.read(block_bytes):
            block = tail + block
            cut = (
                block.rfind(b"\n") + 1
            )  # the last, possibly partial, line waits for the next block
            whole, tail = (block[:cut], block[cut:]) if cut else (b"", block)
            for match in SEPARATOR_LINE.finditer(whole):
                if _is_separator(match.group().decode("utf-8", "replace")):
                    return True
    return bool(tail) and _is_separator(tail.decode("utf-8", "replace"))


def count_characters(file: Path, block_bytes: int = 1 << 24) -> int:
    """Characters of a UTF-8 file as Python reads it with universal newlines (a \\r\\n pair is one
    character): bytes that start a character, less the \\r of each \\r\\n."""
    count, previous = 0, b""
    with open(file, "rb") as stream:
        while block := stream.read(block_bytes):
            values = np.frombuffer(block, dtype=np.uint8)
            count += len(values) - int(np.count_nonzero((values & 0xC0) == 0x80))
            count -= block.count(b"\r\n") + (previous == b"\r" and block[:1] == b"\n")
            previous = block[-1:]
    return count
