import json

import numpy as np
import pytest

from gptlab.data import IGNORE_INDEX, EpochSampler, fixed_subset, open_split, read_meta, token_dtype
from gptlab.tasks.arithmetic import ArithmeticTask, prepare_arithmetic
from gptlab.tasks.text import prepare_text
from gptlab.tokenizer import Tokenizer


def test_arithmetic_splits_cover_every_pair_once(adder_dir):
    meta = read_meta(adder_dir)
    assert meta["splits"] == {"val": 500, "test": 500, "train": 9000}
    tokenizer = Tokenizer.load(adder_dir)
    seen = set()
    for split in ("train", "val", "test"):
        rows = open_split(adder_dir, meta, split, 16, 0).rows(np.arange(meta["splits"][split]))
        pairs = {tokenizer.decode(row.tolist()).split("=")[0] for row in rows}
        assert len(pairs) == len(rows) and not pairs & seen
        seen |= pairs
    assert len(seen) == 100 * 100


def test_answers_are_reversed_and_only_answer_tokens_carry_loss(adder_dir):
    meta = read_meta(adder_dir)
    split = open_split(adder_dir, meta, "train", 16, 0)
    tokenizer = Tokenizer.load(adder_dir)
    inputs, targets = split.fetch(np.arange(20))
    task = ArithmeticTask("adder", 2)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        text = tokenizer.decode(x + [y[-1]])
        a, b = text[:5].rstrip("=").split("+")
        assert text[6:][::-1] == f"{int(a) + int(b):03d}"
        answer_targets = y[task.prompt_length - 1 :]
        assert IGNORE_INDEX not in answer_targets
        assert y[: task.prompt_length - 1] == [IGNORE_INDEX] * (task.prompt_length - 1)


def test_exact_match_rejects_non_digits_and_wrong_numbers():
    task = ArithmeticTask("adder", 3)
    assert task.is_correct("123+456=", "9750")
    assert not task.is_correct("123+456=", "9751")
    assert not task.is_correct("123+456=", "975=")
    assert not task.is_correct("123+456=", "975")
    assert ArithmeticTask("multiplier", 2).is_correct("12*34=", "8040")


def test_sampler_is_deterministic_without_repeats_within_an_epoch():
    sampler = EpochSampler(100, seed=3)
    epochs, indices = sampler.positions(0, 100)
    assert sorted(indices.tolist()) == list(range(100)) and set(epochs.tolist()) == {0}
    _, again = EpochSampler(100, seed=3).positions(0, 100)
    assert np.array_equal(indices, again)
    _, other_seed = EpochSampler(100, seed=4).positions(0, 100)
    assert not np.array_equal(indices, other_seed)
    epochs, next_epoch = sampler.positions(100, 100)
    assert set(epochs.tolist()) == {1} and sorted(next_epoch.tolist()) == list(range(100))
    assert not np.array_equal(indices, next_epoch)
    # Any position is a pure function of (seed, position): a resume needs nothing else.
    _, middle = EpochSampler(100, seed=3).positions(37, 10)
    assert np.array_equal(middle, indices[37:47])


def test_processes_get_disjoint_shares_that_make_up_the_global_batch(adder_dir):
    meta = read_meta(adder_dir)
    split = open_split(adder_dir, meta, "train", 16, 0)
    sampler = EpochSampler(split.num_samples, seed=0)
    world, batch = 4, 8
    shares = [sampler.batch_for_process(split, 64, batch, rank)[0] for rank in range(world)]
    rows = {tuple(row.tolist()) for share in shares for row in share}
    assert len(rows) == world * batch  # disjoint
    global_batch = split.fetch(sampler.positions(64, world * batch)[1])[0]
    assert rows == {tuple(row.tolist()) for row in global_batch}


def test_stream_windows_are_shifted_targets_and_vary_by_epoch(shakespeare_dir):
    meta = read_meta(shakespeare_dir)
    assert meta["vocab_size"] == 65 + 1 and meta["dtype"] == "uint16"  # characters, end-of-text
    split = open_split(shakespeare_dir, meta, "train", 32, seed=0)
    inputs, targets = split.fetch(np.array([0, 5]))
    assert inputs.shape == targets.shape == (2, 32)
    assert np.array_equal(inputs[:, 1:], targets[:, :-1])
    tokenizer = Tokenizer.load(shakespeare_dir)
    assert tokenizer.decode(inputs[0].tolist()).startswith("First Citizen:")
    offsets = {split.epoch_offset(e) for e in range(10)}
    assert len(offsets) > 1 and all(0 <= o < 32 for o in offsets)
    # One document cut by position as nanoGPT does: the last 10% of characters are val, and the
    # document's end-of-text token ends val.
    characters = 1_115_394
    train = int(characters * 0.9)
    assert meta["splits"] == {"train": train, "val": characters - train + 1}
    val = np.fromfile(shakespeare_dir / "val.bin", dtype=np.uint16)
    assert val[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in val[:-1]


def test_fixed_subset_is_stable_and_spread():
    assert np.array_equal(fixed_subset(1000, 10), fixed_subset(1000, 10))
    assert fixed_subset(1000, 10)[[0, -1]].tolist() == [0, 999]
    assert len(fixed_subset(5, 10)) == 5


def test_bpe_text_uses_the_gpt2_tokenizer(tmp_path):
    from conftest import SHARED_DATA

    source = tmp_path / "hello.txt"
    source.write_text("Hello world\n" * 50)
    out = prepare_text(str(source), str(SHARED_DATA / "gpt2-tokenizer"), tmp_path / "hello")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert tokens[:2].tolist() == [15496, 995]
    assert Tokenizer.load(out).decode(tokens[:3].tolist()) == "Hello world\n"


def test_large_vocabularies_use_uint32():
    assert token_dtype(65) == "uint16" and token_dtype(65536) == "uint16"
    assert token_dtype(100_000) == "uint32"


def test_an_existing_data_set_is_not_overwritten_by_mistake(adder_dir):
    from gptlab.errors import UserError

    before = (adder_dir / "train.bin").stat().st_mtime_ns
    with pytest.raises(UserError, match="--overwrite"):
        prepare_arithmetic("adder", adder_dir, digits=2)
    assert (adder_dir / "train.bin").stat().st_mtime_ns == before
