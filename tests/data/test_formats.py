"""Every row format, prompt templates, pre-tokenized rows, last-turn-only, the split policy, and the
template-agnostic assistant mask checked against a template's own {% generation %} mask. Rows that
would fail later (nested too deep, ids the loss cannot take) and templates that fail or never end
are named by row and field."""

from __future__ import annotations

import pickle
import re
import signal
import threading
import time

import datasets
import pytest
from conftest import chats, trained_mask_of
from test_masks import prepare, trained_text

from chatsft import ChatSFTError, SFTConfig
from chatsft.data import templates
from chatsft.data.encode import PrepOptions
from chatsft.data.formats import MAX_DEPTH, normalize
from chatsft.data.prepare import prepare_for_training

# The benchmark workload's ChatML template, which marks assistant turns for TRL.
GENERATION_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] }}"
    "<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_sharegpt_equals_messages(tokenizer):
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    a, _ = prepare([{"conversations": conv}], tokenizer, assistant_only_loss=True)
    b, _ = prepare([{"messages": msgs}], tokenizer, assistant_only_loss=True)
    assert a[0] == b[0]
    with pytest.raises(ChatSFTError, match=r"row 1, field 'conversations\[0\].from'"):
        prepare([{"conversations": [{"from": "alien", "value": "x"}]}], tokenizer)


def test_query_response_with_prompt_template_and_column_map(tokenizer):
    rows = datasets.Dataset.from_list([{"question": "what is two", "answer": "four"}])
    opts = PrepOptions(
        eos_token=tokenizer.eos_token, prompt_template="question : {query} answer : "
    )
    ds, _ = prepare_for_training(
        rows, tokenizer, opts, column_map={"question": "query", "answer": "response"}
    )
    assert tokenizer.decode(ds[0]["input_ids"]) == "question : what is two answer : four<|im_end|>"
    # The prompt's trailing space and "four" are one token of the whole text: it is trained.
    assert trained_text(tokenizer, ds[0]) == [" four<|im_end|>"]


def test_query_response_template_with_response_slot(tokenizer):
    ds, _ = prepare(
        [{"query": "hi", "response": "yo"}],
        tokenizer,
        prompt_template="query : {query} response : {response}",
    )
    assert tokenizer.decode(ds[0]["input_ids"]) == "query : hi response : yo<|im_end|>"
    assert trained_text(tokenizer, ds[0]) == [" yo<|im_end|>"]


def test_query_response_without_template_is_a_chat(tokenizer):
    ds, _ = prepare([{"query": "hi", "response": "yo"}], tokenizer)
    assert trained_text(tokenizer, ds[0]) == ["yo<|im_end|>"]


def test_bad_prompt_template_names_the_field(tokenizer):
    with pytest.raises(ChatSFTError, match="field 'prompt_template'"):
        prepare([{"query": "hi", "response": "yo"}], tokenizer, prompt_template="{missing} {query}")


def test_pretokenized_rows(tokenizer):
    cases = [
        ({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, [False, False, True, True]),
        ({"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}, [False, True, True]),
        ({"input_ids": [9, 10, 11]}, [True] * 3),
    ]
    for row, mask in cases:
        ds, _ = prepare([row], tokenizer)
        assert ds[0]["input_ids"] == row["input_ids"] and trained_mask_of(ds[0]) == mask
    with pytest.raises(ChatSFTError, match="row 1, field 'labels': has 2 entries"):
        prepare([{"input_ids": [1, 2, 3], "labels": [1, 2]}], tokenizer)


def test_last_turn_only(tokenizer):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "what"},
        {"role": "assistant", "content": "five"},
    ]
    ds, _ = prepare([{"messages": msgs}], tokenizer, last_turn_only=True)
    assert trained_text(tokenizer, ds[0]) == ["five<|im_end|>"]


def test_split_policy_keeps_every_token(tokenizer):
    text = "the cat sat on a mat " * 10
    ds, stats = prepare([{"text": text}], tokenizer, max_length=16, overlong_policy="split")
    n_total = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    assert sum(len(x) for x in ds["input_ids"]) == n_total
    assert max(len(x) for x in ds["input_ids"]) == 16
    assert stats.split == 1 and stats.kept == 1 and "1 split" in stats.summary()


def test_config_aliases():
    cfg = SFTConfig(max_len=77, truncate_longer_inputs=False)
    assert cfg.max_length == 77 and cfg.overlong_policy == "drop"


def test_mask_equals_the_templates_generation_mask(tokenizer):
    """Our prefix-rendering mask vs transformers' {% generation %} mask on the same template."""
    tokenizer.chat_template = GENERATION_TEMPLATE
    rows = chats(12, seed=3)
    ds, _ = prepare(rows, tokenizer, assistant_only_loss=True)
    for row, ex in zip(rows, ds):
        ref = tokenizer.apply_chat_template(
            row["messages"], return_assistant_tokens_mask=True, return_dict=True
        )
        assert ex["input_ids"] == ref["input_ids"]
        assert trained_mask_of(ex) == [bool(m) for m in ref["assistant_masks"]]


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Renders only the last user message: earlier turns vanish as the conversation grows.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "what"},
        {"role": "assistant", "content": "five"},
    ]
    with pytest.raises(ChatSFTError, match="not prefix-preserving at message 1"):
        prepare([{"messages": msgs}], tokenizer, assistant_only_loss=True)


def test_constant_length_dataset_streams_packed_isolated_rows(tokenizer):
    from chatsft import ConstantLengthDataset

    rows = chats(40, seed=1)
    opts = PrepOptions(eos_token=tokenizer.eos_token, assistant_only_loss=True, max_length=96)
    stream = ConstantLengthDataset(iter(rows), tokenizer, opts, buffer_size=16)
    packed = list(stream)
    eager, _ = prepare(rows, tokenizer, assistant_only_loss=True, max_length=96)
    assert all(len(r["input_ids"]) <= 96 for r in packed)
    assert sum(len(r["seq_lengths"]) for r in packed) == len(eager) == 40
    # Same documents, same masks: the multiset of (ids, mask) documents is unchanged.
    docs = []
    for r in packed:
        start = 0
        for n in r["seq_lengths"]:
            docs.append(
                (
                    tuple(r["input_ids"][start : start + n]),
                    tuple(trained_mask_of(r)[start : start + n]),
                )
            )
            start += n
    assert sorted(docs) == sorted((tuple(e["input_ids"]), tuple(trained_mask_of(e))) for e in eager)
    assert stream.stats.rows_read == 40 and stream.stats.kept == 40


def test_streaming_dataset_trains(tmp_path, model_dir):
    from chatsft import SFTTrainer

    stream = datasets.Dataset.from_list(chats(32)).to_iterable_dataset()
    cfg = SFTConfig(
        output_dir=str(tmp_path / "o"),
        max_steps=2,
        per_device_train_batch_size=2,
        packing=True,
        max_length=128,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model_dir, args=cfg, train_dataset=stream)
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.train_dataset.stats.rows_read > 0


# A value nested 100,000 levels: json, pyarrow and Jinja's tojson overflow the stack on it.
def deep(levels: int = 100_000) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_rows_nested_too_deep_name_row_and_field():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    cases = [
        ({"messages": deep()}, "messages", "messages"),
        ({"conversations": deep()}, "sharegpt", "conversations"),
        ({"prompt": deep(), "completion": chat[1:]}, "prompt_completion", "prompt"),
        ({"messages": chat, "tools": [{"function": deep(40)}]}, "messages", "tools"),
        ({"messages": chat, "tools": "[" * 100_000 + "]" * 100_000}, "messages", "tools"),
        (
            {"messages": chat, "chat_template_kwargs": {"x": deep()}},
            "messages",
            "chat_template_kwargs",
        ),
    ]
    for row, fmt, field in cases:
        with pytest.raises(ChatSFTError) as err:
            normalize(row, fmt, row_index=3, source="rows.jsonl")
        assert str(err.value).startswith(
            f"rows.jsonl, row 3, field '{field}': nested more than {MAX_DEPTH} levels deep"
        )
    # The limit itself is allowed: a value of exactly MAX_DEPTH levels.
    row = {"messages": chat, "tools": [{"function": deep(MAX_DEPTH - 2)}]}
    assert normalize(row, "messages", row_index=1).tools == row["tools"]


def test_pretokenized_rows_that_would_fail_mid_training(tokenizer):
    cases = [
        ({"input_ids": [5, -1, 7]}, "field 'input_ids': token id -1 is negative"),
        ({"input_ids": [5, 6.5, 7]}, "field 'input_ids': expected a non-empty list of token ids"),
        (
            {"input_ids": [5, 6], "labels": [-100, -3]},
            "field 'labels': label -3 is neither a token id nor -100",
        ),
        ({"input_ids": [5, 6], "labels": [[5], [6]]}, "field 'labels': expected a list of token"),
        ({"input_ids": [5, 6], "completion_mask": 1}, "field 'completion_mask': expected a list"),
    ]
    for row, message in cases:
        with pytest.raises(ChatSFTError, match=re.escape(f"row 1, {message}")):
            normalize(row, "tokenized", row_index=1)
    # -100 and token ids are labels; bool flags are masks.
    example = normalize({"input_ids": [5, 6], "labels": [-100, 6]}, "tokenized", row_index=1)
    assert example.labels == [-100, 6]
    ds, _ = prepare([{"input_ids": [5, 6, 7], "completion_mask": [False, True, True]}], tokenizer)
    assert trained_mask_of(ds[0]) == [False, True, True]


def test_tool_calls_must_be_a_list_of_objects():
    user = {"role": "user", "content": "add two and three"}
    for calls, got in (("add(2, 3)", "str"), ([{"type": "function"}, "x"], "list of dict, str")):
        reply = {"role": "assistant", "tool_calls": calls}
        with pytest.raises(ChatSFTError, match=re.escape(f"got {got}")):
            normalize({"messages": [user, reply]}, "messages", row_index=1)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    row = {"messages": [user, {"role": "assistant", "tool_calls": [call]}]}
    assert normalize(row, "messages", row_index=1).messages[1]["tool_calls"] == [call]


BOOM = (
    "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
    "{% endif %}{{ m['content'] }}{% endfor %}"
)
# 10^10 iterations of an empty loop: several minutes, unless stopped.
ENDLESS = "{% for i in range(100000) %}\n{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_template_errors_name_the_row(tokenizer):
    tokenizer.chat_template = BOOM
    rows = chats(2) + [
        {"messages": [{"role": "user", "content": "boom"}, *chats(1)[0]["messages"][1:]]}
    ]
    with pytest.raises(ChatSFTError) as err:
        prepare(rows, tokenizer)
    assert (
        "row 3, field 'chat_template': the chat template failed to render at template line 1: "
        "no boom" in str(err.value)
    )


@pytest.mark.parametrize("plain", [True, False], ids=["compiled", "apply_chat_template"])
def test_a_template_that_never_ends_is_stopped(tokenizer, monkeypatch, plain):
    monkeypatch.setattr(templates, "RENDER_TIME_LIMIT_S", 0.3)
    tokenizer.chat_template = ENDLESS
    row = chats(1)[0]
    if not plain:  # a key apply_chat_template converts: rendered by transformers itself
        row["messages"][-1]["reasoning_content"] = "hmm"
    start = time.monotonic()
    with pytest.raises(ChatSFTError) as err:
        prepare([row], tokenizer)
    assert time.monotonic() - start < 10
    assert (
        "row 1, field 'chat_template': the chat template took more than 0.3 s to render one "
        "example (still running at template line 2)" in str(err.value)
    )
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no timer left behind
    # The same template renders an example with its loops cut short well within the limit.
    tokenizer.chat_template = ENDLESS.replace("100000", "10") + "{{ messages[0]['content'] }}"
    assert prepare(chats(3), tokenizer)[1].kept == 3


def test_the_time_limit_leaves_other_alarms_and_threads_alone(tokenizer, monkeypatch):
    monkeypatch.setattr(templates, "RENDER_TIME_LIMIT_S", 0.1)
    # About 0.5 s of looping, then the text: over the limit.
    tokenizer.chat_template = ENDLESS.replace("100000", "4000") + "{{ messages[0]['content'] }}"
    row = chats(1)[0]
    # A program's own SIGALRM handler is neither replaced nor raced: no limit applies.
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        ds, _ = prepare([row], tokenizer)
        assert len(ds) == 1 and signal.getsignal(signal.SIGALRM) is not templates._on_alarm
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not fired
    # Another thread renders without the limit (signals reach the main thread only).
    results = []
    thread = threading.Thread(target=lambda: results.append(prepare([row], tokenizer)[0]))
    thread.start()
    thread.join()
    assert len(results[0]) == 1
    err = templates.RenderTimeout(4)
    assert pickle.loads(pickle.dumps(err)).message == err.message  # from map's worker processes
