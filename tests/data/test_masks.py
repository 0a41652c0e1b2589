"""Exact trained-token sets for every format: what the collator will put in labels."""

from __future__ import annotations

import datasets
import pytest
from conftest import trained_mask_of

from chatsft.data.collate import IGNORE_INDEX, PaddedCollator
from chatsft.data.encode import PrepOptions
from chatsft.data.prepare import prepare_for_training


def prepare(rows, tokenizer, **kw):
    opts = PrepOptions(eos_token=tokenizer.eos_token, **kw)
    ds, stats = prepare_for_training(datasets.Dataset.from_list(rows), tokenizer, opts)
    return ds, stats


def trained_text(tokenizer, example) -> list[str]:
    """Maximal runs of trained tokens, decoded."""
    runs, cur = [], []
    for t, m in zip(example["input_ids"], trained_mask_of(example)):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def test_text_trains_everything_and_appends_eos_once(tokenizer):
    ds, _ = prepare([{"text": "the cat sat"}, {"text": "the dog<|im_end|>"}], tokenizer)
    assert trained_text(tokenizer, ds[0]) == ["the cat sat<|im_end|>"]
    assert trained_text(tokenizer, ds[1]) == ["the dog<|im_end|>"]
    assert ds[1]["input_ids"].count(tokenizer.eos_token_id) == 1


def test_messages_assistant_only_multi_turn(tokenizer):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be short"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "what is two plus three"},
                {"role": "assistant", "content": "five"},
            ]
        }
    ]
    ds, stats = prepare(rows, tokenizer, assistant_only_loss=True)
    assert trained_text(tokenizer, ds[0]) == ["yo<|im_end|>", "five<|im_end|>"]
    full = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert tokenizer.decode(ds[0]["input_ids"]) == full
    assert stats.trained_tokens == sum(trained_mask_of(ds[0]))


def test_messages_default_trains_all_tokens(tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    ds, _ = prepare(rows, tokenizer)
    assert all(trained_mask_of(ds[0]))


def test_prompt_completion_plain_trains_completion_and_eos(tokenizer):
    ds, _ = prepare([{"prompt": "what is two plus three", "completion": " five"}], tokenizer)
    assert trained_text(tokenizer, ds[0]) == [" five<|im_end|>"]
    ds, _ = prepare(
        [{"prompt": "what is", "completion": " five"}], tokenizer, completion_only_loss=False
    )
    assert trained_text(tokenizer, ds[0]) == ["what is five<|im_end|>"]


def test_prompt_completion_conversational(tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
        }
    ]
    ds, _ = prepare(rows, tokenizer)
    assert trained_text(tokenizer, ds[0]) == ["yo<|im_end|>"]
    # The model sees exactly the inference-time prompt: template with generation prompt.
    prompt = tokenizer.apply_chat_template(
        rows[0]["prompt"], tokenize=False, add_generation_prompt=True
    )
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ds[0]["input_ids"][:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert not any(trained_mask_of(ds[0])[:n_prompt])


def test_labels_pin_exact_positions(tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    ds, _ = prepare(rows, tokenizer, assistant_only_loss=True)
    batch = PaddedCollator(tokenizer.pad_token_id)([ds[0]])
    ids = ds[0]["input_ids"]
    yo = tokenizer("yo", add_special_tokens=False)["input_ids"]
    expected = (
        [IGNORE_INDEX] * (len(ids) - len(yo) - 2) + yo + [tokenizer.eos_token_id, IGNORE_INDEX]
    )
    assert batch["labels"][0].tolist() == expected


def test_pad_equal_to_eos_keeps_real_eos_trained(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token
    ds, _ = prepare([{"text": "the cat"}, {"text": "the cat sat on a mat"}], tokenizer)
    batch = PaddedCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    n = len(ds[0]["input_ids"])
    assert batch["labels"][0, n - 1].item() == tokenizer.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_truncation_and_drop_are_counted(tokenizer):
    rows = [{"text": "the cat sat on a mat " * 20}, {"text": "hi"}]
    ds, stats = prepare(rows, tokenizer, max_length=10)
    assert stats.truncated == 1 and stats.kept == 2
    assert max(len(x) for x in ds["input_ids"]) == 10
    ds, stats = prepare(rows, tokenizer, max_length=10, overlong_policy="drop")
    assert stats.kept == 1 and stats.dropped == {"longer than max_length": 1}
    assert "1 longer than max_length" in stats.summary()


def test_keep_end_truncation(tokenizer):
    rows = [{"text": "the cat sat on a mat " * 20}]
    ds, _ = prepare(rows, tokenizer, max_length=8, truncation_mode="keep_end")
    assert ds[0]["input_ids"][-1] == tokenizer.eos_token_id


def test_example_left_without_trained_tokens_is_dropped(tokenizer):
    long_prompt = [{"role": "user", "content": "the cat sat on a mat " * 10}]
    rows = [
        {"prompt": long_prompt, "completion": [{"role": "assistant", "content": "yo"}]},
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
        },
    ]
    ds, stats = prepare(rows, tokenizer, max_length=20)
    assert stats.kept == 1 and stats.dropped == {"no trained token left": 1}


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_every_row_dropped_is_an_error(tokenizer, policy):
    from chatsft import ChatSFTError

    rows = [
        {
            "prompt": [{"role": "user", "content": "the cat " * 30}],
            "completion": [{"role": "assistant", "content": "yo"}],
        }
    ]
    with pytest.raises(ChatSFTError, match="every row"):
        prepare(rows, tokenizer, max_length=10, overlong_policy=policy)
