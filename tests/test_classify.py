"""Text classification: the split never leaks a text, the head pools the last real token, freezing
keeps the head trainable, transformers gives the same logits, and a tiny run beats the majority."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import SHARED_DATA, read_metrics, run_script
from gptlab.checkpoints import load_checkpoint, save_checkpoint
from gptlab.data import open_split, read_meta
from gptlab.errors import UserError
from gptlab.tasks.classify import classification_scores, model_label_ids, prepare_classify
from gptlab.tokenizer import Tokenizer
from models import ModelConfig, build_model, freeze_backbone, with_classification_head
from models.classification import last_real_positions

CHNSENTICORP = SHARED_DATA / "chnsenticorp" / "ChnSentiCorp_htl_all.csv"
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    """ChnSentiCorp as prepare_data.py chnsenticorp prepares it, with a short context."""
    out = tmp_path_factory.mktemp("data") / "chnsenticorp"
    return prepare_classify(str(CHNSENTICORP), out, context=64, pooling="eot", keep="end")


def split_texts(data_dir: Path, split: str) -> list[str]:
    """The texts of a split, read back from the token rows (without padding or <|endoftext|>)."""
    meta, tokenizer = read_meta(data_dir), Tokenizer.load(data_dir)
    rows = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])
    rows = rows.reshape(-1, meta["example_length"])
    lengths = np.fromfile(data_dir / f"{split}_lengths.bin", dtype=np.int32)
    lengths -= meta["pooling"] == "eot"
    return [tokenizer.decode(row[:n].tolist()) for row, n in zip(rows, lengths)]


def write_csv(path: Path, rows: list[tuple]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["review", "label"])
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------
# Preparation


def test_no_review_is_in_two_splits_and_every_review_is_in_one(reviews):
    meta = read_meta(reviews)
    assert meta["splits"] == {"train": 6213, "val": 776, "test": 776}
    assert meta["dropped"] == {"empty": 1, "repeated": 0}  # 7,766 rows, one empty review
    rows = {s: np.fromfile(reviews / f"{s}_rows.bin", dtype=np.int32) for s in SPLITS}
    assert sorted(np.concatenate(list(rows.values()))) == [r for r in range(7766) if r != 6374]
    # Each example is its own row's review (its last 63 tokens, then <|endoftext|>) and label.
    table, tokenizer = pd.read_csv(CHNSENTICORP), Tokenizer.load(reviews)
    for split in SPLITS:
        tokens = np.fromfile(reviews / f"{split}.bin", dtype=meta["dtype"]).reshape(-1, 64)
        lengths = np.fromfile(reviews / f"{split}_lengths.bin", dtype=np.int32)
        for row, example, length in zip(rows[split], tokens, lengths):
            expected = tokenizer.encode(table.review[row].strip())[-63:]
            assert example[:length].tolist() == [*expected, tokenizer.eos_token_id]
        ids = np.fromfile(reviews / f"{split}_labels.bin", dtype=np.int32)
        assert [meta["labels"][i] for i in ids] == table.label[rows[split]].astype(str).tolist()
    # Distinct reviews, the split is by review: no review text is in two splits.
    texts = {s: set(table.review[rows[s]]) for s in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not texts[a] & texts[b], (a, b)


def test_a_repeated_text_is_dropped_so_it_cannot_sit_in_two_splits(tmp_path):
    rows = [(f"文本{i}", i % 2) for i in range(40)] + [("文本3", 1), ("  ", 0), ("", 1)]
    out = prepare_classify(str(write_csv(tmp_path / "x.csv", rows)), tmp_path / "d", context=16)
    meta = read_meta(out)
    assert meta["dropped"] == {"empty": 2, "repeated": 1}
    assert sum(meta["splits"].values()) == 40
    seen = [t for split in SPLITS for t in split_texts(out, split)]
    assert sorted(seen) == sorted(f"文本{i}" for i in range(40))


def test_splits_are_stratified_by_label_and_seeded(reviews, tmp_path):
    meta = read_meta(reviews)
    total = {name: sum(meta["label_counts"][s][name] for s in SPLITS) for name in ("0", "1")}
    assert total == {"0": 2443, "1": 5322}
    for split, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        for name, count in meta["label_counts"][split].items():
            assert abs(count - share * total[name]) <= 1, (split, name)
        labels = np.fromfile(reviews / f"{split}_labels.bin", dtype=np.int32)
        assert [int((labels == i).sum()) for i in (0, 1)] == list(
            meta["label_counts"][split].values()
        )
    # The same seed gives the same split; another seed another one.
    again = prepare_classify(
        str(CHNSENTICORP), tmp_path / "a", context=64, pooling="eot", keep="end"
    )
    other = prepare_classify(
        str(CHNSENTICORP), tmp_path / "b", context=64, pooling="eot", keep="end", seed=1
    )
    test = (reviews / "test.bin").read_bytes()
    assert (again / "test.bin").read_bytes() == test != (other / "test.bin").read_bytes()


def test_long_texts_keep_their_start_end_or_both_and_are_counted(reviews, tmp_path):
    meta = read_meta(reviews)
    assert meta["truncated"]["train"] > 1000  # a context of 64: most reviews are longer
    tokenizer = Tokenizer.load(reviews)
    rows = np.fromfile(reviews / "train.bin", dtype=meta["dtype"]).reshape(-1, 64)
    lengths = np.fromfile(reviews / "train_lengths.bin", dtype=np.int32)
    eot, pad = tokenizer.eos_token_id, meta["pad_token_id"]
    assert all(rows[i, n - 1] == eot for i, n in enumerate(lengths))  # the pooled position
    assert all((rows[i, n:] == pad).all() and pad not in rows[i, :n] for i, n in enumerate(lengths))

    long_text = "1" + "短" * 100 + "2"  # characters the short texts have too
    csv = write_csv(
        tmp_path / "long.csv", [(long_text, 0), *((f"短{i}", i % 2) for i in range(30))]
    )
    kept = {"start": "1" + "短" * 9, "end": "短" * 9 + "2", "both": "1" + "短" * 8 + "2"}
    for keep, expected in kept.items():
        out = prepare_classify(str(csv), tmp_path / keep, context=10, keep=keep)
        texts = [t for split in SPLITS for t in split_texts(out, split)]
        assert [t for t in texts if len(t) == 10] == [expected]
        assert sum(read_meta(out)["truncated"].values()) == 1


def test_only_the_classifier_tokenizer_appends_end_of_text_for_transformers(tmp_path):
    """With end-of-text pooling, transformers' tokenizer must append the token the head pools
    at; the language-model set prepared beside it must not (a prompt would end its text)."""
    data, lm_data = tmp_path / "cls", tmp_path / "lm"
    prepare_classify(str(CHNSENTICORP), data, context=64, pooling="eot", lm_dir=lm_data)
    eot = Tokenizer.load(data).eos_token_id
    classifier_ids = AutoTokenizer.from_pretrained(data)("好的")["input_ids"]
    lm_ids = AutoTokenizer.from_pretrained(lm_data)("好的")["input_ids"]
    assert classifier_ids == [*lm_ids, eot] and eot not in lm_ids


def test_with_bos_each_text_also_starts_with_end_of_text_and_transformers_does_the_same(
    reviews, tmp_path
):
    """--bos: every row is <|endoftext|>, the text (one token shorter than without), <|endoftext|>,
    the split is the same, and transformers' tokenizer gives exactly the row of a text."""
    out = prepare_classify(
        str(CHNSENTICORP), tmp_path / "bos", context=64, pooling="eot", keep="end", bos=True
    )
    meta, tokenizer = read_meta(out), Tokenizer.load(out)
    assert meta["bos"] and not read_meta(reviews)["bos"]
    eot, theirs = tokenizer.eos_token_id, AutoTokenizer.from_pretrained(out)
    for split in SPLITS:
        assert (out / f"{split}_rows.bin").read_bytes() == (
            reviews / f"{split}_rows.bin"
        ).read_bytes()
        rows = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).reshape(-1, 64)
        lengths = np.fromfile(out / f"{split}_lengths.bin", dtype=np.int32)
        plain = np.fromfile(reviews / f"{split}.bin", dtype=meta["dtype"]).reshape(-1, 64)
        plain_lengths = np.fromfile(reviews / f"{split}_lengths.bin", dtype=np.int32)
        for row, n, other, m in zip(rows, lengths, plain, plain_lengths):
            assert row[0] == row[n - 1] == eot and eot not in row[1 : n - 1]
            body = other[: m - 1] if m < 64 else other[1 : m - 1]  # keep="end": the end is kept
            assert row[1 : n - 1].tolist() == body.tolist()
    texts = pd.read_csv(CHNSENTICORP)["review"]
    test_rows = np.fromfile(out / "test_rows.bin", dtype=np.int32)
    rows = np.fromfile(out / "test.bin", dtype=meta["dtype"]).reshape(-1, 64)
    lengths = np.fromfile(out / "test_lengths.bin", dtype=np.int32)
    fitting = [(row, n, source) for row, n, source in zip(rows, lengths, test_rows) if n < 64]
    assert len(fitting) > 50
    for row, n, source in fitting[:50]:  # a text that fits: transformers' ids are the row's
        assert theirs(texts[source])["input_ids"] == row[:n].tolist()

    # Pooling at the last token: <|endoftext|> goes before the text only.
    csv = write_csv(tmp_path / "short.csv", [(f"短{i}", i % 2) for i in range(30)])
    last = prepare_classify(str(csv), tmp_path / "last", context=8, bos=True)
    ids = AutoTokenizer.from_pretrained(last)("短1")["input_ids"]
    assert ids == [Tokenizer.load(last).eos_token_id, *Tokenizer.load(last).encode("短1")]


def test_end_of_text_tokens_need_one_in_the_tokenizer(tmp_path):
    """A tokenizer with <|pad|> but no <|endoftext|>: pooling at an appended <|endoftext|> and
    --bos are refused in one line, before anything is written."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    vocab = {"<|pad|>": 0, "<|unk|>": 1, "good": 2, "bad": 3}
    (tmp_path / "tok").mkdir()
    Backend(WordLevel(vocab, unk_token="<|unk|>")).save(str(tmp_path / "tok" / "tokenizer.json"))
    csv = write_csv(
        tmp_path / "words.csv", [(f"{'good' if i % 2 else 'bad'} {i}", i % 2) for i in range(30)]
    )
    for flags, message in (({"pooling": "eot"}, "--pooling eot"), ({"bos": True}, "--bos")):
        with pytest.raises(UserError, match=f"^{message} needs an end-of-text token"):
            prepare_classify(
                str(csv), tmp_path / "out", tokenizer_name=str(tmp_path / "tok"), **flags
            )
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "named, expected",
    [
        # ours: <|endoftext|> ends and begins a text, <|pad|> pads, <|unk|> is unknown
        ({}, ("<|endoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>")),
        # GPT-2's hub tokenizer names <|endoftext|> as its unk_token too: no unknown token then
        (
            {
                "eos_token": "<|endoftext|>",
                "bos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            },
            ("<|endoftext|>", "<|endoftext|>", None, None),
        ),
        # Llama's: its own beginning token
        (
            {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"},
            ("</s>", "<s>", "<|pad|>", "<unk>"),
        ),
        # BERT's: no eos_token, so [SEP] ends a text and [CLS] begins one
        (
            {
                "sep_token": "[SEP]",
                "cls_token": "[CLS]",
                "pad_token": "[PAD]",
                "unk_token": "[UNK]",
            },
            ("[SEP]", "[CLS]", "[PAD]", "[UNK]"),
        ),
    ],
)
def test_a_loaded_tokenizer_keeps_the_special_tokens_its_files_name(tmp_path, named, expected):
    """The special tokens of tokenizer_config.json (or special_tokens_map.json) are read, kept,
    and saved again so that a reload (and transformers) finds the same ones."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    tokens = [
        "<|endoftext|>",
        "<|pad|>",
        "<|unk|>",
        "</s>",
        "<s>",
        "<unk>",
        "[SEP]",
        "[CLS]",
        "[PAD]",
        "[UNK]",
        "好",
    ]
    if named.get("unk_token") == "<|endoftext|>":  # GPT-2 has neither <|pad|> nor <|unk|>
        tokens = [t for t in tokens if t not in ("<|pad|>", "<|unk|>")]
    backend = Backend(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[-2]))
    source = tmp_path / "source"
    source.mkdir()
    backend.save(str(source / "tokenizer.json"))
    file = "special_tokens_map.json" if "sep_token" in named else "tokenizer_config.json"
    (source / file).write_text(json.dumps(named))
    loaded = Tokenizer.load(source)
    names = (loaded.eos_token, loaded.bos_token, loaded.pad_token, loaded.unk_token)
    assert names == expected
    (tmp_path / "saved").mkdir()
    loaded.save(tmp_path / "saved")
    again = Tokenizer.load(tmp_path / "saved")
    assert (again.eos_token, again.bos_token, again.pad_token, again.unk_token) == expected
    theirs = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert (theirs.eos_token, theirs.bos_token) == expected[:2]
    assert (theirs.pad_token, theirs.unk_token) == expected[2:]


def test_characters_unseen_in_training_read_as_unknown(reviews):
    tokenizer = Tokenizer.load(reviews)
    assert tokenizer.encode("好☃")[1] == tokenizer.unknown_token_id
    assert read_meta(reviews)["unknown_tokens"]["test"] > 0


@pytest.mark.parametrize(
    "rows, columns, message",
    [
        ([("好", 1), ("好吗", 1), ("不好", 1)], {}, "has 1 class"),
        ([("a", 0), ("b", 1)], {"text_column": "label"}, "holds int64, not text"),
        ([("a", 0), ("b", 1)], {"text_column": "text"}, "has no column 'text'"),
        (
            [(f"t{i}", 0) for i in range(20)] + [("u", 1), ("v", 1)],
            {"val_fraction": 0.5, "test_fraction": 0.4},  # one "1" in val, the other in test
            r"has only 2 example\(s\), none of them in the training",
        ),
        ([("a", 0), ("b", "")], {}, "have no 'label'"),
    ],
)
def test_bad_labelled_files_are_refused_and_nothing_is_written(tmp_path, rows, columns, message):
    csv = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(UserError, match=message):
        prepare_classify(str(csv), tmp_path / "out", seed=3, **columns)
    assert not (tmp_path / "out").exists()


def test_a_split_that_would_be_empty_is_refused_before_anything_is_written(tmp_path):
    csv = write_csv(tmp_path / "x.csv", [(f"文本{i}", i % 2) for i in range(10)])
    with pytest.raises(UserError, match=r"the val split would be empty \(10 texts at --val_frac"):
        prepare_classify(str(csv), tmp_path / "d", context=8, val_fraction=0.01)
    assert not (tmp_path / "d").exists()


def test_prepare_data_refuses_a_missing_file_with_one_line(tmp_path):
    result = run_script(
        "prepare_data.py", "classify", "--input", "missing.csv", cwd=tmp_path, check=False
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "missing.csv not found" in result.stderr and not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------------------------
# The head


def classifier(arch: str, vocab: int = 20, pad: int = 19) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        arch=arch, n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=vocab, dropout=0.0
    )
    return with_classification_head(build_model(config), ["neg", "neu", "pos"], pad).eval()


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_the_head_pools_the_last_real_token_whatever_the_padding(arch):
    model = classifier(arch)
    texts = [[3, 5, 7, 9, 11], [4, 6], [8, 8, 8, 8, 8, 8, 8, 8]]
    padded = torch.full((3, 10), 19)
    for i, ids in enumerate(texts):
        padded[i, : len(ids)] = torch.tensor(ids)
    assert last_real_positions(padded, 19).tolist() == [4, 1, 7]
    with torch.no_grad():
        batch = model(padded)
        for i, ids in enumerate(texts):  # each text alone, without any padding
            assert torch.allclose(batch[i], model(torch.tensor([ids]))[0], atol=1e-6)
        # Pooling is at the last real token: changing it changes the logits, padding does not.
        other = padded.clone()
        other[1, 1] = 5
        assert not torch.allclose(model(other)[1], batch[1])
        other = padded.clone()
        other[1, 2:] = 19
        other[1, 5] = 19
        assert torch.equal(model(other), batch)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_freezing_the_backbone_trains_the_head_last_block_and_final_norm_only(arch):
    model = classifier(arch).train()
    freeze_backbone(model, train_blocks=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    final_norm = "ln_f" if arch == "gpt" else "norm_f"
    assert "score.weight" in trainable and f"{final_norm}.weight" in trainable
    assert {n.split(".")[0] for n in trainable} == {"score", "blocks", final_norm}
    assert all(n.startswith("blocks.1.") for n in trainable if n.startswith("blocks"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randint(0, 19, (4, 6)), torch.tensor([0, 1, 2, 1])).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name
    # No block trains with train_blocks=0; the head still does.
    freeze_backbone(model, train_blocks=0)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"score", final_norm}


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_transformers_loads_our_classifier_and_gives_the_same_logits(arch, tmp_path):
    tokenizer = Tokenizer.from_chars("abcdefghijklmnop", ("<|pad|>", "<|unk|>"))
    model = classifier(arch, vocab=tokenizer.vocab_size, pad=tokenizer.pad_token_id)
    with torch.no_grad():
        model.score.weight.normal_()  # a trained head, not the small initial one
    save_checkpoint(tmp_path / arch, model, tokenizer, {}, {"step": 1, "val_accuracy": 0.5})
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / arch).eval()
    assert type(theirs).__name__ == ("GPT2" if arch == "gpt" else "Llama") + (
        "ForSequenceClassification"
    )
    assert theirs.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert theirs.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert theirs.config.pad_token_id == tokenizer.pad_token_id
    batch = AutoTokenizer.from_pretrained(tmp_path / arch)(
        ["abcabcdd", "ponm", "f"], padding=True, return_tensors="pt"
    )["input_ids"]
    assert batch[2, 1:].eq(tokenizer.pad_token_id).all()
    with torch.no_grad():
        ours = model(batch)
        assert (theirs(batch).logits - ours).abs().max().item() <= 1e-4
        assert torch.equal(load_checkpoint(tmp_path / arch).model(batch), ours)


def test_each_example_weighs_the_same_whatever_micro_batch_or_padding_it_has(reviews):
    """The step's loss is the mean over its examples: one micro-batch of 6 and three of 2 (each
    cut to its own longest text) give the same update."""
    from accelerate import Accelerator

    from gptlab.training import train_step

    split = open_split(reviews, read_meta(reviews), "train", 64, seed=0)
    lengths = split.column("lengths")
    order = np.argsort(lengths)
    indices = np.concatenate([order[:2], order[1000:1002], order[-2:]])  # short, mid, long
    widths = [split.fetch(indices[i : i + 2])[0].size(1) for i in (0, 2, 4)]
    assert widths[0] < widths[1] < widths[2] == 64
    updated = []
    for micro_batches in (
        [split.fetch(indices)],
        [split.fetch(indices[i : i + 2]) for i in (0, 2, 4)],
    ):
        torch.manual_seed(0)
        config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=2964)
        model = with_classification_head(build_model(config), ["0", "1"], 2962)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loss, targets, _ = train_step(model, optimizer, Accelerator(cpu=True), micro_batches, 0.0)
        assert targets == 6
        updated.append((loss.item(), [p.detach().clone() for p in model.parameters()]))
    assert updated[0][0] == pytest.approx(updated[1][0], rel=1e-5)
    for a, b in zip(updated[0][1], updated[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_label_the_classifier_never_saw_is_refused_at_evaluation():
    meta = {"format": "classify", "labels": ["neg", "neu", "pos", "mixed"]}
    with pytest.raises(UserError, match=r"label\(s\) \['mixed'\] that the classifier was not"):
        model_label_ids(classifier("gpt"), meta)
    # A data set with fewer classes, numbered differently, maps by name.
    meta["labels"] = ["neu", "pos"]
    assert model_label_ids(classifier("gpt"), meta).tolist() == [1, 2]


def test_every_process_scores_its_share_in_as_many_forward_passes():
    """A sharded (FSDP) model's forward pass is collective: a process running one fewer would
    leave the others waiting forever. 257 rows over 2 processes at 128 a pass are 129 and 128
    rows: both must run 2 passes, and together count each row once."""
    from types import SimpleNamespace

    from gptlab.tasks.classify import confusion_matrix

    class Rows:
        tokens = torch.arange(257)[:, None] % 3  # rows 0, 1, 2, 0, ...; label: the row mod 2
        labels = torch.arange(257) % 2

        def fetch(self, indices):
            return self.tokens[indices], self.labels[indices]

    class Counting(torch.nn.Module):
        """Predicts class 1 for a row holding 1, else class 0; counts its forward passes."""

        config = SimpleNamespace(num_labels=2)
        passes = 0

        def forward(self, tokens):
            self.passes += 1
            return torch.nn.functional.one_hot((tokens[:, 0] == 1).long(), 2).float()

    total, passes = np.zeros((2, 2), dtype=np.int64), []
    for rank in (0, 1):
        model = Counting()
        process = SimpleNamespace(
            device="cpu", process_index=rank, num_processes=2, reduce=lambda t, _: t
        )
        total += confusion_matrix(model, Rows(), np.arange(257), np.arange(2), process, 128)
        passes.append(model.passes)
    assert passes == [2, 2]
    truth, predicted = np.arange(257) % 2, (np.arange(257) % 3 == 1).astype(int)
    expected = [[int(((truth == t) & (predicted == q)).sum()) for q in (0, 1)] for t in (0, 1)]
    assert total.tolist() == expected and total.sum() == 257


def test_scores_from_a_confusion_matrix():
    matrix = np.array([[8, 2], [1, 9]])  # rows: true, columns: predicted
    scores = classification_scores(matrix, ["neg", "pos"])
    assert scores["accuracy"] == 0.85 and scores["majority_class_accuracy"] == 0.5
    assert scores["per_class"]["neg"]["precision"] == pytest.approx(8 / 9)
    assert scores["per_class"]["neg"]["recall"] == pytest.approx(0.8)
    assert scores["per_class"]["pos"]["f1"] == pytest.approx(2 * (9 / 11) * 0.9 / (9 / 11 + 0.9))


# ----------------------------------------------------------------------------------------------
# End to end


TINY_CLASSIFIER = [
    "--model.n_layer=1",
    "--model.n_head=2",
    "--model.n_embd=32",
    "--model.block_size=64",
    "--batch_size=32",
    "--lr.peak=0.003",
    "--weight_decay.peak=0.0",
    "--macro_batch_steps=50",
    "--data.eval_samples=128",
]


@pytest.mark.slow
def test_a_tiny_classifier_beats_the_majority_class_and_transformers_agrees(reviews, tmp_path):
    run_script(
        "train.py",
        f"--data.dir={reviews}",
        *TINY_CLASSIFIER,
        "--max_steps=150",
        f"--out_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    evals = [e for e in read_metrics(tmp_path / "run") if "val_loss" in e]
    assert [e["step"] for e in evals] == [50, 100, 150]
    assert all(0.0 <= e["val_accuracy"] <= 1.0 for e in evals)
    best = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert best["val_accuracy"] == max(e["val_accuracy"] for e in evals)

    output = tmp_path / "test.json"
    result = run_script(
        "evaluate.py",
        "--task=classify",
        f"--checkpoint={tmp_path / 'run'}",
        "--split=test",
        f"--output={output}",
        cwd=tmp_path,
    )
    scores = json.loads(output.read_text())
    assert scores["total"] == 776 and scores["majority_class_accuracy"] == pytest.approx(532 / 776)
    assert scores["accuracy"] > scores["majority_class_accuracy"] + 0.03, scores["accuracy"]
    assert "confusion matrix" in result.stdout and f"{scores['accuracy']:.2%}" in result.stdout

    # transformers predicts what we predict on the whole test split.
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "best").eval()
    split = open_split(reviews, read_meta(reviews), "test", 64, seed=0)
    inputs, labels = split.fetch(np.arange(split.num_samples))
    with torch.no_grad():
        predicted = theirs(inputs).logits.argmax(-1)
    assert (predicted == labels).float().mean().item() == pytest.approx(scores["accuracy"])


@pytest.mark.slow
def test_fine_tunes_of_one_model_averaged_are_a_classifier(reviews, tmp_path):
    """The README's model soup in small: one base, two fine-tunes that differ in their seed, the
    mean of their final weights scored like any checkpoint."""
    train = ["train.py", f"--data.dir={reviews}", *TINY_CLASSIFIER]
    run_script(*train, "--max_steps=100", "--out_dir=base", cwd=tmp_path)
    for seed in (2, 3):
        run_script(
            *train, "--init_from=base", "--max_steps=50", f"--seed={seed}", "--keep_best=0",
            f"--out_dir=seed{seed}", cwd=tmp_path,
        )  # fmt: skip
    run_script(
        "train.py", "--average", "seed2/latest", "seed3/latest", "--out_dir=soup", cwd=tmp_path
    )
    scores = {}
    for name in ("seed2/latest", "seed3/latest", "soup"):
        output = tmp_path / f"{name.split('/')[0]}.json"
        run_script(
            "evaluate.py", "--task=classify", f"--checkpoint={name}", f"--output={output}",
            cwd=tmp_path,
        )  # fmt: skip
        scores[name] = json.loads(output.read_text())
    soup, seeds = scores.pop("soup"), list(scores.values())
    assert soup["total"] == 776 and soup["majority_class_accuracy"] == pytest.approx(532 / 776)
    assert soup["accuracy"] > soup["majority_class_accuracy"] + 0.03, soup["accuracy"]
    # Fine-tunes of one model sit in one basin: their mean is no worse than the weaker of them.
    assert soup["accuracy"] >= min(s["accuracy"] for s in seeds) - 0.02, (soup, seeds)


@pytest.mark.slow
def test_a_language_model_fine_tuned_with_a_frozen_backbone(reviews, tmp_path):
    """Pretrain on the training reviews, then train only the head and the final norm."""
    lm_data, data = tmp_path / "lm_data", tmp_path / "cls"
    # Another vocabulary than `reviews` (every training character), to see a mismatch refused.
    prepare_classify(str(CHNSENTICORP), data, context=64, min_char_count=1, lm_dir=lm_data)
    tiny = [a for a in TINY_CLASSIFIER if not a.startswith("--data.eval")]
    run_script(
        "train.py", f"--data.dir={lm_data}", *tiny, "--max_steps=20", "--out_dir=lm", cwd=tmp_path
    )
    # The classifier must use the language model's tokenizer: the reviews prepared above do not.
    result = run_script(
        "train.py",
        f"--data.dir={reviews}",
        "--init_from=lm",
        "--max_steps=10",
        "--out_dir=bad",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "different tokenizer" in result.stderr
    assert not (tmp_path / "bad").exists()

    result = run_script(
        "evaluate.py",
        "--task=classify",
        "--checkpoint=lm",
        f"--data_dir={data}",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "language model, not a classifier" in result.stderr

    run_script(
        "train.py",
        f"--data.dir={data}",
        "--init_from=lm",
        "--finetune.freeze=backbone",
        "--batch_size=32",
        "--max_steps=20",
        "--macro_batch_steps=10",
        "--out_dir=cls_run",
        cwd=tmp_path,
    )
    log = (tmp_path / "cls_run" / "metrics.jsonl").read_text()
    lm, classifier = load_checkpoint(tmp_path / "lm").model, load_checkpoint(tmp_path / "cls_run")
    n_trainable = classifier.model.score.weight.numel() + sum(
        p.numel() for p in classifier.model.ln_f.parameters()
    )
    assert f"{n_trainable:,} of " in log
    for name, weight in classifier.model.state_dict().items():
        if name.startswith("blocks.") or name in ("wte.weight", "wpe.weight"):
            assert torch.equal(weight, lm.state_dict()[name]), name
    assert not torch.equal(classifier.model.ln_f.weight, lm.ln_f.weight)


@pytest.mark.slow
def test_a_hugging_face_gpt2_fine_tuned_as_a_classifier(tmp_path):
    """init_from a transformers GPT-2 directory, with the GPT-2 tokenizer: it pads with
    <|endoftext|>, so pooling at an appended <|endoftext|> is refused with that tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "gpt2" / name).write_bytes((SHARED_DATA / "gpt2-tokenizer" / name).read_bytes())
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = [(f"the room was {words[i % 6]} {i}", int(i % 6 < 3)) for i in range(60)]
    csv = write_csv(tmp_path / "en.csv", rows)
    with pytest.raises(UserError, match="--pooling eot needs a pad token"):
        prepare_classify(
            str(csv), tmp_path / "eot", tokenizer_name=str(tmp_path / "gpt2"), pooling="eot"
        )
    data = prepare_classify(
        str(csv), tmp_path / "data", tokenizer_name=str(tmp_path / "gpt2"), context=16
    )
    assert read_meta(data)["pad_token_id"] == 50256
    run_script(
        "train.py",
        f"--data.dir={data}",
        f"--init_from={tmp_path / 'gpt2'}",
        "--batch_size=8",
        "--max_steps=4",
        "--macro_batch_steps=2",
        "--out_dir=run",
        cwd=tmp_path,
    )
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "best").eval()
    assert type(theirs).__name__ == "GPT2ForSequenceClassification"
    assert theirs.config.pad_token_id == 50256 and theirs.config.id2label == {0: "0", 1: "1"}
    split = open_split(data, read_meta(data), "test", 16, seed=0)
    inputs, _ = split.fetch(np.arange(split.num_samples))
    with torch.no_grad():
        ours = load_checkpoint(tmp_path / "run").model(inputs)
        assert (theirs(inputs).logits - ours).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_a_bert_vocabulary_gpt2_is_fine_tuned_with_its_own_special_tokens(tmp_path):
    """The Chinese GPT-2s of the hub (uer/gpt2-chinese-cluecorpussmall) have a BERT vocabulary:
    a vocab.txt, no tokenizer.json and no eos_token, texts pretrained as [CLS] text [SEP]. Such a
    directory is a tokenizer and a starting point: rows are [CLS] text [SEP] [PAD]..., the head
    pools at [SEP], and the classifier exported from it reads raw text in transformers as ours
    does (same ids, same logits)."""
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    hub = tmp_path / "gpt2-chinese"
    hub.mkdir()
    texts = pd.read_csv(CHNSENTICORP)["review"].dropna().astype(str)[:400]
    chars = sorted({char for text in texts for char in text if not char.isspace()})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (hub / "vocab.txt").write_text("\n".join(specials + chars) + "\n", encoding="utf-8")
    BertTokenizerFast.from_pretrained(hub).save_pretrained(hub)
    (hub / "tokenizer.json").unlink()  # as on the hub: the vocabulary and two small JSON files
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(specials) + len(chars),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=None,
        eos_token_id=None,
    )
    GPT2LMHeadModel(config).save_pretrained(hub)
    csv = write_csv(tmp_path / "zh.csv", [(text, i % 2) for i, text in enumerate(texts)])
    data = prepare_classify(
        str(csv), tmp_path / "data", tokenizer_name=str(hub), context=32, pooling="eot", bos=True
    )
    tokenizer = Tokenizer.load(data)
    cls, sep, pad = (tokenizer.backend.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (cls, sep)
    assert read_meta(data)["pad_token_id"] == pad
    rows = np.fromfile(data / "train.bin", dtype=read_meta(data)["dtype"]).reshape(-1, 32)
    lengths = np.fromfile(data / "train_lengths.bin", dtype=np.int32)
    for row, n in zip(rows, lengths):
        assert row[0] == cls and row[n - 1] == sep and (row[n:] == pad).all()
        assert not np.isin(row[1 : n - 1], [cls, sep, pad]).any()

    run_script(
        "train.py",
        f"--data.dir={data}",
        f"--init_from={hub}",
        "--batch_size=8",
        "--max_steps=4",
        "--macro_batch_steps=2",
        "--out_dir=run",
        cwd=tmp_path,
    )
    best = tmp_path / "run" / "best"
    theirs = AutoModelForSequenceClassification.from_pretrained(best).eval()
    assert (theirs.config.bos_token_id, theirs.config.pad_token_id) == (cls, pad)
    fitting = [text for text in texts if len(text) <= 20][:8]
    encoded = AutoTokenizer.from_pretrained(best)(fitting, padding=True, return_tensors="pt")
    ours = load_checkpoint(tmp_path / "run")
    for text, ids in zip(fitting, encoded["input_ids"]):
        assert ids[ids != pad].tolist() == [cls, *ours.tokenizer.encode(text), sep]
    with torch.no_grad():
        mine = ours.model(encoded["input_ids"])
        assert (theirs(**encoded).logits - mine).abs().max().item() <= 1e-4
