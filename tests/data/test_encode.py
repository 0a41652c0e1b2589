"""One path for every example: the map path, streaming and `chatsft inspect` encode every data format
to the same ids and trained masks, because all of them call data.encode.encode."""

from __future__ import annotations

import datasets
import pytest
from conftest import chats, trained_mask_of

from chatsft.data.encode import PrepOptions, encode, prompt_of
from chatsft.data.formats import Conversation, Text, apply_formatting_func, normalize
from chatsft.data.prepare import prepare_dataset, row_format
from chatsft.data.streaming import ConstantLengthDataset
from chatsft.errors import ChatSFTError
from chatsft.generation.generate import prompt_ids
from chatsft.inspect.measure import attributed_tokens

MAX_LENGTH = 40  # short enough that some rows are cut (or split)


def _chat(i: int) -> list[dict]:
    return chats(8, seed=i)[i % 8]["messages"]


def _rows(fmt: str) -> list[dict]:
    """Six rows of one format, some longer than MAX_LENGTH."""
    out = []
    for i in range(6):
        msgs = _chat(i)
        user, reply = msgs[0]["content"], msgs[1]["content"]
        long = " ".join([user] * (1 + i // 2))
        out.append(
            {
                "text": {"text": f"{long} {reply}"},
                "messages": {"messages": msgs},
                "prompt_completion": {"prompt": long + " ", "completion": reply},
                "prompt_completion_chat": {
                    "prompt": [{"role": "user", "content": long}],
                    "completion": [{"role": "assistant", "content": reply}],
                },
                "query_response": {"query": long, "response": reply},
                "sharegpt": {
                    "conversations": [
                        {"from": "human", "value": long},
                        {"from": "gpt", "value": reply},
                    ]
                },
                "input_ids_labels": {
                    "input_ids": list(range(5, 12 + 4 * i)),
                    "labels": [-100] * 3 + list(range(8, 12 + 4 * i)),
                },
                "input_ids_mask": {
                    "input_ids": list(range(5, 12 + 4 * i)),
                    "completion_mask": [0, 0] + [1] * (5 + 4 * i),
                },
                "input_ids_only": {"input_ids": list(range(5, 12 + 4 * i))},
                "func_str": {"q": long, "a": reply},
                "func_list": {"q": long, "a": reply},
            }[fmt]
        )
    return out


FORMATTING_FUNCS = {
    "func_str": lambda r: f"Q: {r['q']} A: {r['a']}",
    "func_list": lambda r: [f"Q: {r['q']} A: {r['a']}"],  # older TRL formatting funcs
}
FORMATS = [
    "text",
    "messages",
    "prompt_completion",
    "prompt_completion_chat",
    "query_response",
    "sharegpt",
    "input_ids_labels",
    "input_ids_mask",
    "input_ids_only",
    *FORMATTING_FUNCS,
]


@pytest.fixture(params=["no_bos", "bos"])
def any_tokenizer(request, tokenizer):
    """The test tokenizer as it is, and with a Llama-style BOS prefix (the BOS rule applies to
    plain strings only)."""
    if request.param == "bos":
        from tokenizers import processors

        bos = "<|endoftext|>"
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
        )
        tokenizer.bos_token = bos
    return tokenizer


def _opts(tokenizer, policy: str) -> PrepOptions:
    return PrepOptions(
        eos_token=tokenizer.eos_token,
        assistant_only_loss=True,
        prompt_template="Question: {query}\nAnswer: {response}",
        max_length=MAX_LENGTH,
        overlong_policy=policy,
    )


def _map_rows(rows, tokenizer, opts, formatting_func):
    prepared, _ = prepare_dataset(
        datasets.Dataset.from_list(rows), tokenizer, opts, formatting_func=formatting_func
    )
    return [dict(r) for r in prepared]


def _stream_rows(rows, tokenizer, opts, formatting_func):
    stream = ConstantLengthDataset(
        iter(rows), tokenizer, opts, packing=False, formatting_func=formatting_func, buffer_size=4
    )
    return list(stream)


def _inspect_rows(rows, tokenizer, opts, formatting_func):
    """The rows `chatsft inspect` counts roles over (inspect.measure.attributed_tokens)."""
    fmt = row_format(list(rows[0]), lambda: rows[0], opts, formatting_func)
    out = []
    for i, row in enumerate(rows):
        if formatting_func is not None:
            row = apply_formatting_func(row, formatting_func, i + 1)
        example = normalize(
            row,
            fmt,
            row_index=i + 1,
            dataset_text_field="text",
            prompt_template=opts.prompt_template,
        )
        encoded, roles = attributed_tokens(example, tokenizer, opts, i + 1)
        assert len(roles) == len(encoded.input_ids)
        out += [{"input_ids": ids, "labels": labels} for ids, labels in encoded.rows()]
    return out


@pytest.mark.parametrize("policy", ["truncate", "split"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_map_streaming_and_inspect_encode_every_format_alike(fmt, policy, any_tokenizer):
    rows = _rows(fmt)
    opts = _opts(any_tokenizer, policy)
    func = FORMATTING_FUNCS.get(fmt)
    mapped = _map_rows(rows, any_tokenizer, opts, func)
    streamed = _stream_rows(rows, any_tokenizer, opts, func)
    inspected = _inspect_rows(rows, any_tokenizer, opts, func)
    assert len(mapped) >= 2  # rows whose trained part was cut off are dropped, alike everywhere
    for other in (streamed, inspected):
        assert [r["input_ids"] for r in other] == [r["input_ids"] for r in mapped]
        assert [r["labels"] for r in other] == [r["labels"] for r in mapped]
    if not fmt.startswith("input_ids"):
        masks = [trained_mask_of(r) for r in mapped]
        assert all(len(r["input_ids"]) <= MAX_LENGTH for r in mapped)
        assert all(any(m[1:]) for m in masks)


def test_bos_rule_plain_strings_only(any_tokenizer):
    opts = _opts(any_tokenizer, "truncate")
    prefix = any_tokenizer("x")["input_ids"][:-1]
    plain, chat = encode(
        [Text("the cat sat"), Conversation(_chat(0))], any_tokenizer, opts, with_offsets=True
    )
    assert plain.input_ids[: len(prefix)] == prefix and plain.labels[: len(prefix)] == [-100] * len(
        prefix
    )
    assert plain.offsets is not None and plain.offsets[: len(prefix)] == [(0, 0)] * len(prefix)
    assert chat.input_ids[:1] == any_tokenizer.convert_tokens_to_ids(["<|im_start|>"])


# --- the streaming bugs of issue #16, pinned ---------------------------------------------------------


def test_streaming_formatting_func_returning_a_one_element_list(tokenizer):
    """It used to fail with "field 'messages': expected a non-empty list" when streaming."""
    rows = _rows("func_list")
    opts = _opts(tokenizer, "truncate")
    func = FORMATTING_FUNCS["func_list"]
    assert _stream_rows(rows, tokenizer, opts, func) == _map_rows(rows, tokenizer, opts, func)


def test_streaming_errors_count_rows_from_one(tokenizer):
    """The first row of a stream is row 1 (it used to be named row 2), in every buffer."""
    opts = _opts(tokenizer, "truncate")
    bad = {"messages": []}
    for position in (0, 5):  # the first buffer, and the second (buffer_size 4)
        rows = [*chats(position), bad, *chats(3)]
        stream = ConstantLengthDataset(iter(rows), tokenizer, opts, packing=False, buffer_size=4)
        with pytest.raises(ChatSFTError) as err:
            list(stream)
        assert err.value.row == position + 1
        assert f"row {position + 1}, field 'messages'" in str(err.value)


# --- prompts for generation ------------------------------------------------------------------------


def test_generation_prompts_encode_as_inference_renders_them(any_tokenizer):
    chat = _chat(1)
    conversation, text = encode(
        [Conversation(chat), Text("the cat")], any_tokenizer, for_generation=True
    )
    assert prompt_of(Conversation(chat)) == chat[:-1]
    assert conversation.input_ids == prompt_ids(any_tokenizer, chat[:-1])
    assert conversation.input_ids == any_tokenizer.apply_chat_template(
        chat[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert text.input_ids == prompt_ids(any_tokenizer, "the cat")
    assert set(conversation.labels) == {-100}  # nothing trained in a prompt
    with pytest.raises(ChatSFTError, match="nothing to continue"):
        encode([Text("")], any_tokenizer, for_generation=True)
