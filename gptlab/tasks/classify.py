"""Text classification: labelled texts (a CSV, JSONL or parquet file, or a Hugging Face data set),
how they are prepared, and their scoring by accuracy, per-class precision/recall/F1 and the
confusion matrix.

Preparation is right by construction: empty texts and repeated texts are dropped first (a text
seen twice could otherwise sit in two splits), then the examples are split, stratified by label
and seeded, and only then is anything tokenized, truncated or padded. Every text is one example
of at most `context` tokens, never cut into pieces, so no part of a text is in two splits. A
character vocabulary is built from the training texts alone.

On disk (see gptlab.data.LabelledSplit): per split `<split>.bin` (rows of `context` token ids,
padded on the right with <|pad|>), `<split>_labels.bin`, `<split>_lengths.bin` and
`<split>_rows.bin` (int32; the last is the row of the input each example came from), and in
meta.json the class names by id and what preparation dropped, truncated and counted.
"""

import argparse
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from gptlab import storage
from gptlab.cli import fraction, positive_int, random_seed
from gptlab.data import is_data_set, token_dtype, write_data_set
from gptlab.errors import UserError
from gptlab.evaluation import process_share
from gptlab.tasks.text import SplitFile
from gptlab.tokenizer import END_OF_TEXT, PAD, UNKNOWN, Tokenizer

CHNSENTICORP = "../shared/data/chnsenticorp/ChnSentiCorp_htl_all.csv"
CHNSENTICORP_SOURCE = (
    "https://github.com/SophonPlus/ChineseNlpCorpus (datasets/ChnSentiCorp_htl_all/"
    "ChnSentiCorp_htl_all.csv)"
)
FILE_KINDS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "val", "test")
KEEP = ("start", "end", "both")
"""What of a text longer than the context is kept (see kept_part)."""


# ----------------------------------------------------------------------------------------------
# Reading labelled texts


def read_labelled(source: str, text_column: str, label_column: str, hf_split: str) -> tuple:
    """(texts, labels) of a CSV/JSONL/parquet file or a Hugging Face data set (its hf_split),
    read with `datasets`; the text column must hold text and every row needs a label."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    path = Path(source)
    with tempfile.TemporaryDirectory() as cache:  # nothing is left in ~/.cache
        try:
            if path.is_file() and path.suffix.lower() not in FILE_KINDS:
                raise UserError(
                    f"--input {source}: unknown file type {path.suffix!r}; use "
                    f"{', '.join(FILE_KINDS)} or a Hugging Face data set name"
                )
            if path.is_file():
                kind = FILE_KINDS[path.suffix.lower()]
                data = datasets.load_dataset(
                    kind, data_files=str(path), split="train", cache_dir=cache
                )
            elif path.suffix.lower() in FILE_KINDS or path.exists() or source.count("/") > 1:
                raise UserError(f"--input {source} not found; give a file or a data set name")
            else:  # a Hugging Face data set name such as "lansinuote/ChnSentiCorp"
                data = datasets.load_dataset(source, split=hf_split, cache_dir=cache)
        except UserError:
            raise
        except Exception as error:  # a malformed file, an unknown or unreachable data set, ...
            reason = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
            raise UserError(f"could not read --input {source}: {reason[:300]}") from None
        columns = list(data.column_names)
        for flag, column in (("--text_column", text_column), ("--label_column", label_column)):
            if column not in columns:
                raise UserError(
                    f"{source} has no column {column!r}; name one of {columns} with {flag}"
                )
        feature = data.features[text_column]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            kind = getattr(feature, "dtype", type(feature).__name__)
            raise UserError(
                f"column {text_column!r} of {source} holds {kind}, not text; name the text "
                f"column with --text_column (columns: {columns})"
            )
        texts, labels = data[text_column], data[label_column]
    missing = [i for i, label in enumerate(labels) if label is None or label == ""]
    if missing:
        raise UserError(
            f"{len(missing)} row(s) of {source} have no {label_column!r} (the first is row "
            f"{missing[0]}); label them or remove them"
        )
    return texts, labels


def label_names(labels: list) -> list[str]:
    """The class names, by class id: numbers in numeric order, other names alphabetically."""
    distinct = set(labels)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in distinct):
        return [str(v) for v in sorted(distinct)]
    return sorted(str(v) for v in distinct)


@dataclass
class Examples:
    texts: list[str]
    label_ids: np.ndarray
    labels: list[str]
    """Class names by id."""
    dropped: dict[str, int]
    """Texts dropped before the split: empty ones and repeats of an earlier text."""
    rows: np.ndarray
    """The row of the input each example came from."""


def clean(texts: list, labels: list, source: str) -> Examples:
    """Drop empty and repeated texts (counted), and number the labels."""
    kept_texts, kept_labels, kept_rows, seen = [], [], [], set()
    dropped = {"empty": 0, "repeated": 0}
    for row, (text, label) in enumerate(zip(texts, labels)):
        text = (text or "").strip()
        if not text:
            dropped["empty"] += 1
        elif text in seen:
            dropped["repeated"] += 1
        else:
            seen.add(text)
            kept_texts.append(text)
            kept_labels.append(label)
            kept_rows.append(row)
    names = label_names(kept_labels)
    if len(names) < 2:
        raise UserError(
            f"the label column of {source} has {len(names)} class(es) "
            f"({', '.join(names) or 'no texts'}); a classifier needs at least 2"
        )
    ids = {name: i for i, name in enumerate(names)}
    label_ids = np.array([ids[str(label)] for label in kept_labels], dtype=np.int32)
    return Examples(kept_texts, label_ids, names, dropped, np.array(kept_rows, dtype=np.int32))


def stratified_split(
    label_ids: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Example indices of each split: every class is shuffled (seeded) and cut in the same
    proportions, so each split has the label mix of the whole; each index is in one split."""
    rng = np.random.default_rng(seed)
    parts = {split: [] for split in SPLITS}
    for label in range(int(label_ids.max()) + 1):
        members = rng.permutation(np.flatnonzero(label_ids == label))
        n_val = round(len(members) * val_fraction)
        n_test = round(len(members) * test_fraction)
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {split: np.sort(np.concatenate(chosen)) for split, chosen in parts.items()}


# ----------------------------------------------------------------------------------------------
# Tokenizing


def char_vocabulary(train_texts: list[str], min_count: int) -> Tokenizer:
    """Characters seen at least min_count times in the training texts, and <|endoftext|>,
    <|pad|>, <|unk|>. Rarer and unseen characters read as <|unk|>, whose embedding thus learns
    from the rare characters of the training texts."""
    counts = Counter(char for text in train_texts for char in text)
    chars = "".join(char for char, count in counts.items() if count >= min_count)
    return Tokenizer.from_chars(chars, (PAD, UNKNOWN))


def padding_token(tokenizer: Tokenizer, pooling: str) -> int:
    """The id rows are padded with: the tokenizer's pad token (<|pad|>, BERT's [PAD]), or GPT-2's
    convention of its end-of-text token where it has none (which then cannot also mark the pooled
    position)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer has neither a pad token ({PAD}) nor an end-of-text token "
            f"({END_OF_TEXT}) to pad texts with; use --tokenizer char, or a tokenizer that has one"
        )
    if pooling == "eot":
        raise UserError(
            f"--pooling eot needs a pad token other than {tokenizer.eos_token}, and this tokenizer "
            "has none; use --pooling last, or --tokenizer char"
        )
    return tokenizer.eos_token_id


@dataclass
class EncodedSplit:
    rows: np.ndarray
    """(n, context) token ids, padded on the right."""
    lengths: np.ndarray
    labels: np.ndarray
    truncated: int
    unknown_tokens: int


def kept_part(ids: list[int], room: int, keep: str) -> list[int]:
    """The `room` tokens of a longer text that are kept: its start, its end, or "both": the
    first half of the room from its start and the rest from its end (reviews often open with
    the facts and close with the verdict; head-and-tail is also what Sun et al. 2019 found best
    for long texts)."""
    if keep == "start":
        return ids[:room]
    if keep == "end":
        return ids[len(ids) - room :]
    head = room // 2
    return ids[:head] + ids[len(ids) - (room - head) :]


def end_of_text_tokens(pooling: str, bos: bool) -> int:
    """How many markers each row adds to its text: an end-of-text token after it with pooling
    "eot", a beginning-of-text token before it with bos (both <|endoftext|> in ours and GPT-2's
    vocabulary; BERT's vocabulary has [SEP] and [CLS])."""
    return (pooling == "eot") + bos


def encode_split(
    texts: list[str],
    labels: np.ndarray,
    tokenizer: Tokenizer,
    context: int,
    pooling: str,
    keep: str,
    pad: int,
    bos: bool = False,
) -> EncodedSplit:
    """Token rows of the texts: cut to the context (see kept_part), the end-of-text token appended
    with pooling "eot" and the beginning-of-text token put before the text with bos, padded on the
    right."""
    room = context - end_of_text_tokens(pooling, bos)
    rows = np.full((len(texts), context), pad, dtype=token_dtype(tokenizer.vocab_size))
    lengths = np.zeros(len(texts), dtype=np.int32)
    truncated = unknown = 0
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if pad in ids:
            raise UserError(
                f"a text holds the padding token {tokenizer.decode([pad])!r} literally; remove it "
                f"from the text: {text[:80]!r}"
            )
        if len(ids) > room:
            truncated += 1
            ids = kept_part(ids, room, keep)
        if pooling == "eot":
            ids = [*ids, tokenizer.eos_token_id]
        if bos:
            ids = [tokenizer.bos_token_id, *ids]
        unknown += sum(token == tokenizer.unknown_token_id for token in ids)
        rows[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return EncodedSplit(rows, lengths, labels.astype(np.int32), truncated, unknown)


def end_of_text_template(tokenizer: Tokenizer, after: bool, before: bool) -> None:
    """Make transformers' AutoTokenizer put the end-of-text token after every text (pooling
    "eot") and the beginning-of-text token before it (bos), as the data does."""
    from tokenizers.processors import TemplateProcessing

    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    text = " ".join([bos] * before + ["$A"] + [eos] * after)
    markers = {(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)}
    tokenizer.backend.post_processor = TemplateProcessing(
        single=text, pair=f"{text} {text.replace('$A', '$B')}", special_tokens=sorted(markers)
    )


# ----------------------------------------------------------------------------------------------
# Preparing a data set


def prepare_classify(
    source: str,
    out_dir: Path,
    text_column: str = "review",
    label_column: str = "label",
    tokenizer_name: str = "char",
    context: int = 256,
    pooling: str = "last",
    keep: str = "start",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    min_char_count: int = 2,
    lm_dir: Path | None = None,
    hf_split: str = "train",
    overwrite: bool = False,
    bos: bool = False,
) -> Path:
    """Write a classification data set (see the module docstring) to out_dir, and with lm_dir
    a language-modelling data set of the same texts with the same tokenizer for pretraining:
    train is the training texts, val the val texts, each followed by <|endoftext|>.

    With bos every text also starts with the tokenizer's beginning-of-text token (<|endoftext|>,
    as GPT-2 marks a text's beginning; [CLS] in a BERT vocabulary): a language model pretrained
    on texts that each follow it then reads a text to classify as it read them."""
    if pooling not in ("last", "eot"):
        raise UserError(f"--pooling {pooling!r}: use last or eot")
    if keep not in KEEP:
        raise UserError(f"--keep {keep!r}: use start, end or both")
    # A token of each text and the row's <|endoftext|>s; at least 2 in any case.
    least = max(2, 1 + end_of_text_tokens(pooling, bos))
    if context < least:
        raise UserError(f"--context {context} must be at least {least}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError("--val_fraction and --test_fraction must be positive and sum below 1")
    reads_from = [Path(source)] if Path(source).exists() else []
    if lm_dir is not None and Path(lm_dir).resolve() == Path(out_dir).resolve():
        raise UserError("--lm_dir must differ from the classification data set's directory")
    for directory in [out_dir] if lm_dir is None else [out_dir, lm_dir]:  # before any work
        storage.check_output_dir(Path(directory), "data set", is_data_set, reads_from)
        if is_data_set(directory) and not overwrite:
            raise UserError(f"data set {directory} already exists; pass --overwrite to replace it")

    texts, labels = read_labelled(source, text_column, label_column, hf_split)
    examples = clean(texts, labels, source)
    splits = stratified_split(examples.label_ids, val_fraction, test_fraction, seed)
    for split, share in (("val", val_fraction), ("test", test_fraction)):
        if not len(splits[split]):  # training scores on val, and scoring an empty split fails
            raise UserError(
                f"the {split} split would be empty ({len(examples.texts)} texts at "
                f"--{split}_fraction {share:g}); give more texts or a larger --{split}_fraction"
            )
    for label, name in enumerate(examples.labels):
        if not (examples.label_ids[splits["train"]] == label).any():
            count = int((examples.label_ids == label).sum())
            raise UserError(
                f"label {name!r} has only {count} example(s), none of them in the training "
                "split; give it more examples, or drop or merge it"
            )
    split_texts = {split: [examples.texts[i] for i in splits[split]] for split in SPLITS}
    if tokenizer_name == "char":
        tokenizer = char_vocabulary(split_texts["train"], min_char_count)
    else:
        tokenizer = Tokenizer.load(tokenizer_name)
    pad = padding_token(tokenizer, pooling)
    if end_of_text_tokens(pooling, bos) and tokenizer.eos_token_id is None:
        flags = "--pooling eot" if pooling == "eot" else "--bos"
        raise UserError(
            f"{flags} needs an end-of-text token ({END_OF_TEXT}) in the tokenizer; use "
            "--tokenizer char"
        )
    encoded = {
        split: encode_split(
            split_texts[split],
            examples.label_ids[splits[split]],
            tokenizer,
            context,
            pooling,
            keep,
            pad,
            bos,
        )
        for split in SPLITS
    }
    plain = tokenizer.backend.post_processor  # the language-model set's (see below)
    if end_of_text_tokens(pooling, bos):
        end_of_text_template(tokenizer, after=pooling == "eot", before=bos)

    def fill(tmp_dir: Path) -> dict:
        for split, data in encoded.items():
            data.rows.tofile(tmp_dir / f"{split}.bin")
            data.labels.tofile(tmp_dir / f"{split}_labels.bin")
            data.lengths.tofile(tmp_dir / f"{split}_lengths.bin")
            examples.rows[splits[split]].tofile(tmp_dir / f"{split}_rows.bin")
        return {
            "format": "classify",
            "dtype": str(encoded["train"].rows.dtype),
            "example_length": context,
            "labels": examples.labels,
            "pad_token_id": pad,
            "pooling": pooling,
            "keep": keep,
            "bos": bos,
            "splits": {split: len(data.labels) for split, data in encoded.items()},
            "label_counts": {
                split: {
                    name: int((data.labels == i).sum()) for i, name in enumerate(examples.labels)
                }
                for split, data in encoded.items()
            },
            "dropped": examples.dropped,
            "truncated": {split: data.truncated for split, data in encoded.items()},
            "unknown_tokens": {split: data.unknown_tokens for split, data in encoded.items()},
            "source": source,
            "text_column": text_column,
            "label_column": label_column,
            "tokenizer": tokenizer_name,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
        }

    write_data_set(out_dir, tokenizer, fill, overwrite, reads_from)
    if lm_dir is not None:
        # Without the classifier's end-of-text template: with it, transformers would end every
        # prompt to the language model with <|endoftext|>, and it would continue after an end.
        tokenizer.backend.post_processor = plain
        write_pretraining_set(lm_dir, tokenizer, split_texts, source, overwrite, reads_from)
    return Path(out_dir)


def write_pretraining_set(
    lm_dir: Path,
    tokenizer: Tokenizer,
    split_texts: dict[str, list[str]],
    source: str,
    overwrite: bool,
    reads_from: list[Path],
) -> Path:
    """The training texts (train) and the val texts (val) as token streams, each text followed
    by <|endoftext|>: for pretraining a language model that the classifier then starts from."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"--lm_dir needs a tokenizer with {END_OF_TEXT}; use --tokenizer char")
    dtype = token_dtype(tokenizer.vocab_size)

    def fill(tmp_dir: Path) -> dict:
        files = {split: SplitFile(tmp_dir / f"{split}.bin", dtype) for split in ("train", "val")}
        for split, out in files.items():
            texts = split_texts[split]
            out.path.touch()
            out.write(
                tokenizer.encode_batch(texts), texts, [True] * len(texts), tokenizer.eos_token_id
            )
        return {
            "format": "stream",
            "dtype": dtype,
            "splits": {split: out.tokens for split, out in files.items()},
            "bytes": {split: out.bytes for split, out in files.items()},
            "documents": {split: out.documents for split, out in files.items()},
            "eos_token_id": tokenizer.eos_token_id,
            "split_by": "document",
            "source": source,
        }

    return write_data_set(lm_dir, tokenizer, fill, overwrite, reads_from)


# ----------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def confusion_matrix(
    model: torch.nn.Module,
    split,
    indices: np.ndarray,
    to_model_ids: np.ndarray,
    accelerator: Accelerator,
    batch_size: int,
) -> np.ndarray:
    """Counts (true class, predicted class) over `indices` of the split, in the model's class
    ids (to_model_ids maps the data set's), shared out over and summed across processes. Every
    process runs as many forward passes (see process_share): a sharded model's are collective."""
    was_training = model.training
    model.eval()
    size = model.config.num_labels
    counts = torch.zeros(size * size, device=accelerator.device, dtype=torch.float64)
    share, real = process_share(indices, accelerator)
    mapping = torch.from_numpy(to_model_ids)
    for start in range(0, len(share), batch_size):
        inputs, labels = split.fetch(share[start : start + batch_size])
        predicted = model(inputs.to(accelerator.device)).argmax(dim=-1)
        cells = mapping[labels].to(accelerator.device) * size + predicted
        cells = cells[: max(0, real - start)]  # the share's padding counts for nothing
        counts += torch.bincount(cells, minlength=size * size).double()
    model.train(was_training)
    counts = accelerator.reduce(counts, "sum")
    return counts.view(size, size).round().long().cpu().numpy()


def classification_scores(matrix: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, per-class precision, recall, F1 and support, and macro F1 of a confusion matrix
    (rows: true class, columns: predicted). A ratio with nothing to count is 0."""

    def ratio(a, b) -> float:
        return float(a / b) if b else 0.0

    per_class = {}
    for i, name in enumerate(labels):
        precision = ratio(matrix[i, i], matrix[:, i].sum())
        recall = ratio(matrix[i, i], matrix[i].sum())
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": ratio(2 * precision * recall, precision + recall),
            "support": int(matrix[i].sum()),
        }
    total = int(matrix.sum())
    return {
        "accuracy": ratio(np.trace(matrix), total),
        "correct": int(np.trace(matrix)),
        "total": total,
        "majority_class_accuracy": ratio(matrix.sum(axis=1).max(), total),
        "macro_f1": float(np.mean([scores["f1"] for scores in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "true_by_predicted": matrix.tolist()},
    }


def model_label_ids(model: torch.nn.Module, meta: dict) -> np.ndarray:
    """The model's class id of each of the data set's classes, matched by name; a class the model
    was not trained on, or a model that is not a classifier, is refused."""
    model_labels = model.config.labels
    if not model_labels:  # first: the data set of a language model is never a classification set
        raise UserError(
            "the checkpoint is a language model, not a classifier; make one by fine-tuning it: "
            "`python train.py --init_from=CHECKPOINT --data.dir=DATA` with DATA from "
            "`prepare_data.py classify`"
        )
    if meta.get("format") != "classify":
        raise UserError(
            "the data set is not a classification set; use --data_dir with one made by "
            "`prepare_data.py classify`, or another --task"
        )
    unseen = [name for name in meta["labels"] if name not in model_labels]
    if unseen:
        raise UserError(
            f"the data set has label(s) {unseen} that the classifier was not trained on (it "
            f"knows {model_labels}); score it on data with those labels only"
        )
    return np.array([model_labels.index(name) for name in meta["labels"]], dtype=np.int64)


def format_report(scores: dict) -> str:
    """The accuracy line, a per-class table and the confusion matrix, as evaluate.py prints them."""
    labels = scores["confusion_matrix"]["labels"]
    width = max(9, *(len(name) for name in labels))
    lines = [
        f"accuracy {scores['accuracy']:.2%} ({scores['correct']:,} of {scores['total']:,}; "
        f"majority class {scores['majority_class_accuracy']:.2%}), macro F1 "
        f"{scores['macro_f1']:.4f}",
        f"{'class':<{width}}  precision  recall     f1  support",
    ]
    for name, row in scores["per_class"].items():
        lines.append(
            f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:.4f}  "
            f"{row['support']:7,}"
        )
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    lines.append(" " * width + "".join(f"  {name:>{width}}" for name in labels))
    for name, row in zip(labels, scores["confusion_matrix"]["true_by_predicted"]):
        lines.append(f"{name:<{width}}" + "".join(f"  {count:>{width},}" for count in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# prepare_data.py classify|chnsenticorp and evaluate.py --task classify

COMMANDS = {
    "classify": "labelled texts (CSV/JSONL/parquet or a Hugging Face data set) for a classifier",
    "chnsenticorp": "ChnSentiCorp hotel reviews (positive/negative), 80/10/10",
}
SCORES = {"classify": "accuracy, per-class precision/recall/F1, confusion matrix (classifiers)"}
CHECKPOINT_METRIC = "val_accuracy"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "chnsenticorp":
        parser.add_argument(
            "--input", default=CHNSENTICORP, help=f"the CSV (default: {CHNSENTICORP})"
        )
    else:
        parser.add_argument(
            "--input", required=True, help="a .csv, .jsonl or .parquet file, or a HF data set name"
        )
        parser.add_argument("--text_column", default="review", help="column of the texts")
        parser.add_argument("--label_column", default="label", help="column of the labels")
        parser.add_argument("--hf_split", default="train", help="split of a HF data set to read")
        parser.add_argument("--name", default="classify", help="data set name (under data/)")
        parser.add_argument("--val_fraction", type=fraction, default=0.1)
        parser.add_argument("--test_fraction", type=fraction, default=0.1)
        parser.add_argument("--seed", type=random_seed, default=0, help="seed of the split")
    parser.add_argument(
        "--tokenizer",
        default="char",
        help="'char' (the training texts' characters), or the tokenizer directory or hub name of "
        "a model to fine-tune",
    )
    parser.add_argument(
        "--context",
        type=positive_int,
        default=256,
        help="tokens per text, <|endoftext|> (a BERT vocabulary's [CLS], [SEP]) included",
    )
    parser.add_argument(
        "--pooling",
        choices=("last", "eot"),
        default="last",
        help="classify at the text's last token, or at an <|endoftext|> ([SEP]) appended to it",
    )
    parser.add_argument(
        "--keep",
        choices=KEEP,
        default="start",
        help="of a text longer than the context keep the start, the end, or both (half each)",
    )
    parser.add_argument(
        "--bos",
        action="store_true",
        help="start each text with <|endoftext|> ([CLS]) too, as every text of the pretraining "
        "set does",
    )
    parser.add_argument(
        "--min_char_count",
        type=positive_int,
        default=2,
        help="char vocabulary: rarer training characters read as <|unk|>",
    )
    parser.add_argument(
        "--lm_dir", help="also write the train/val texts here as a language-modelling data set"
    )


def prepare(command: str, args: argparse.Namespace, out_dir: Path) -> Path:
    if command == "chnsenticorp" and not Path(args.input).is_file():
        raise UserError(
            f"{args.input} not found; download ChnSentiCorp_htl_all.csv from "
            f"{CHNSENTICORP_SOURCE} and pass it with --input"
        )
    return prepare_classify(
        args.input,
        out_dir,
        text_column=getattr(args, "text_column", "review"),
        label_column=getattr(args, "label_column", "label"),
        tokenizer_name=getattr(args, "tokenizer", "char"),
        context=args.context,
        pooling=args.pooling,
        keep=args.keep,
        val_fraction=getattr(args, "val_fraction", 0.1),
        test_fraction=getattr(args, "test_fraction", 0.1),
        seed=getattr(args, "seed", 0),
        min_char_count=args.min_char_count,
        lm_dir=Path(args.lm_dir) if args.lm_dir else None,
        hf_split=getattr(args, "hf_split", "train"),
        overwrite=args.overwrite,
        bos=args.bos,
    )


def score(task_name: str, model, tokenizer, meta: dict, split, indices, accelerator, batch_size):
    """Accuracy, per-class precision/recall/F1 and the confusion matrix over the split."""
    to_model_ids = model_label_ids(model, meta)
    matrix = confusion_matrix(model, split, indices, to_model_ids, accelerator, batch_size)
    scores = classification_scores(matrix, model.config.labels)
    return scores, format_report(scores)


def val_metrics(meta: dict, tokenizer: Tokenizer, split, samples: int):
    """What each evaluation in training adds: the accuracy over the whole val split (the best
    checkpoint is chosen on it, so it is never a sample)."""
    indices = np.arange(split.num_samples)
    to_model_ids = np.arange(len(meta["labels"]))

    def metrics(model: torch.nn.Module, accelerator: Accelerator) -> dict:
        matrix = confusion_matrix(model, split, indices, to_model_ids, accelerator, 256)
        return {"val_accuracy": float(np.trace(matrix) / max(1, matrix.sum()))}

    return metrics
