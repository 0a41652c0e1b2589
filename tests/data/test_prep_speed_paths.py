"""The shortcuts of data preparation give exactly what the plain paths give: templates compiled with
an inlined {% generation %} tag, direct calls to the Rust tokenizer, trained tokens located from
byte lengths instead of offsets, the frozen heap."""

from __future__ import annotations

import gc
import json
import random
import unicodedata
from typing import Any

import pytest
from conftest import chats
from test_formats import GENERATION_TEMPLATE

from chatsft.data import tokenize as tokenize_module
from chatsft.data.prepare import _frozen_heap
from chatsft.data.templates import _compiled_template, _InlineGeneration, render_chat
from chatsft.data.tokenize import (
    _byte_length_table,
    _plain_backend,
    _runs_from_lengths,
    encode_segments,
    token_runs,
    tokenize_rendered,
)

HEAD = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
TAIL = "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
# Generation bodies that a plain scope renders like transformers' caller macro.
INLINED = {
    "workload": GENERATION_TEMPLATE,
    "loop_vars": HEAD + "{% generation %}{{ m['content'] }}{{ loop.index }}{% if loop.last %}!"
    "{% endif %}{% endgeneration %}<|im_end|>\n" + TAIL,
    "whitespace_control": HEAD + "{%- generation -%}\n  {{ m['content'] | trim }}\n"
    "{%- endgeneration %}\n<|im_end|>\n" + TAIL,
    "namespace": "{% set ns = namespace(n=0) %}" + HEAD + "{% generation %}"
    "{% set ns.n = ns.n + 1 %}{{ m['content'] }}#{{ ns.n }}{% endgeneration %}<|im_end|>\n"
    "{% endfor %}{{ ns.n }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "nested": HEAD + "{% generation %}{% for w in m['content'].split() %}{% if loop.first %}"
    "{{ w | upper }}{% else %} {{ w }}{% endif %}{% endfor %}{% generation %}.{% endgeneration %}"
    "{% endgeneration %}<|im_end|>\n" + TAIL,
}
# Bodies where a scope might differ from a macro: these keep transformers' template.
KEPT = {
    "set_leaks_nowhere": "{% set x = 'outer' %}" + HEAD + "{% generation %}{% set x = 'inner' %}"
    "{{ m['content'] }}{% endgeneration %}{{ x }}<|im_end|>\n" + TAIL,
    "varargs": HEAD + "{% generation %}{{ m['content'] }}{{ varargs }}{% endgeneration %}"
    "<|im_end|>\n" + TAIL,
}


def _conversations() -> list[list[dict]]:
    return [row["messages"] for row in chats(8, seed=5)]


@pytest.mark.parametrize("name", [*INLINED, *KEPT])
def test_render_equals_apply_chat_template(tokenizer, name):
    tokenizer.chat_template = {**INLINED, **KEPT}[name]
    for messages in _conversations():
        for end in range(1, len(messages) + 1):
            for prompt in (False, True):
                ours = render_chat(tokenizer, messages[:end], None, prompt)
                ref = tokenizer.apply_chat_template(
                    messages[:end], tokenize=False, add_generation_prompt=prompt
                )
                assert ours == ref


@pytest.mark.parametrize(
    ("name", "inlined"), [*((n, True) for n in INLINED), *((n, False) for n in KEPT)]
)
def test_generation_is_inlined_only_where_safe(name, inlined):
    compiled, _ = _compiled_template({**INLINED, **KEPT}[name])
    exts = compiled.environment.extensions.values()
    assert any(isinstance(e, _InlineGeneration) for e in exts) == inlined


def test_encode_segments_equals_the_tokenizer_call(tokenizer):
    texts = ["", "hi", " the cat<|im_end|>\n", "<|im_start|>user\nwhat is two<|im_end|>", "\n\n"]
    assert _plain_backend(tokenizer) is not None
    ref = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert encode_segments(tokenizer, texts) == ref


def test_encode_segments_falls_back_when_the_backend_would_truncate(tokenizer):
    texts = ["the cat sat on a mat " * 20]
    ref = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokenizer.backend_tokenizer.enable_truncation(max_length=5)
    assert _plain_backend(tokenizer) is None
    assert encode_segments(tokenizer, texts) == ref  # __call__ turns truncation off again


def test_frozen_heap_unfreezes_and_leaves_a_callers_freeze_alone():
    with _frozen_heap():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with _frozen_heap():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_prepared_rows_are_not_reused_across_chatsft_code_versions(
    tmp_path, tokenizer, monkeypatch
):
    """datasets caches a map by its function's code; the data package's own code is part of the
    fingerprint too, so an upgrade never reads rows an older chatsft prepared."""
    import json

    import datasets

    import chatsft.data.prepare as prepare

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chats(8)))
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    opts = prepare.PrepOptions(eos_token=tokenizer.eos_token)
    first, _ = prepare.prepare_dataset(rows, tokenizer, opts)
    again, _ = prepare.prepare_dataset(rows, tokenizer, opts)
    assert again._fingerprint == first._fingerprint  # same code: the cache is used
    monkeypatch.setattr(prepare, "data_code_version", lambda: "another-version")
    upgraded, _ = prepare.prepare_dataset(rows, tokenizer, opts)
    assert upgraded._fingerprint != first._fingerprint


# --- trained tokens located without offsets (byte-level BPE) --------------------------------------

PIECES = ["the", " cat", "\n", "  ", "é", "e\u0301", "😀", "中文", "<|im_end|>", "<|im_start|>"]
PIECES += ["\t", "ß", "ﬁ", "12", "!?", "\u00a0", "x"]


def _variant(tokenizer: Any, **changes: Any) -> Any:
    """The fixture's tokenizer with parts of its tokenizer.json replaced."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    config = {**json.loads(tokenizer.backend_tokenizer.to_str()), **changes}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(config)), eos_token="<|im_end|>"
    )


QWEN2_LIKE = {  # Qwen2 / Llama-3 layout: NFC, a regex split, byte level without its regex
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+"},
                "behavior": "Isolated",
                "invert": False,
            },
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False},
        ],
    },
    "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False},
}


@pytest.mark.parametrize("layout", ["gpt2", "qwen2"])
def test_trained_runs_from_byte_lengths_equal_the_offset_rule(tokenizer, layout):
    tok = tokenizer if layout == "gpt2" else _variant(tokenizer, **QWEN2_LIKE)
    backend = _plain_backend(tok)
    table = _byte_length_table(backend)
    assert table is not None and table.nfc == (layout == "qwen2")
    rng = random.Random(3)
    located = 0
    for _ in range(1500):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.choice([2, 4, 6]))))
        spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
        enc = backend.encode(text, add_special_tokens=False)
        runs = _runs_from_lengths(enc.ids, table, text, spans)
        if runs is None:  # only a text the NFC normalizer changes
            assert layout == "qwen2" and not unicodedata.is_normalized("NFC", text)
            continue
        located += 1
        assert runs == token_runs(enc.offsets, spans), (text, spans)
    assert located > 700


def test_batches_give_the_same_labels_with_and_without_offsets(tokenizer, monkeypatch):
    tok = _variant(tokenizer, **QWEN2_LIKE)
    rng = random.Random(4)
    examples = [
        [(rng.choice(PIECES) * rng.randint(1, 3), rng.random() < 0.5) for _ in range(6)]
        for _ in range(300)
    ]
    fast = tokenize_rendered(tok, examples)
    monkeypatch.setattr(tokenize_module, "_runs_without_offsets", lambda *args: None)
    assert fast == tokenize_rendered(tok, examples)


@pytest.mark.parametrize(
    "changes",
    [
        {"post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}},
        {"normalizer": {"type": "Lowercase"}},
        {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True}},
        {"pre_tokenizer": {"type": "Whitespace"}},
        {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}},
    ],
    ids=["trimmed offsets", "normalizer", "prefix space", "word split", "sentencepiece"],
)
def test_byte_lengths_only_where_tokens_are_the_texts_bytes(tokenizer, changes):
    assert _byte_length_table(_plain_backend(_variant(tokenizer, **changes))) is None


def test_byte_lengths_refused_for_an_added_token_that_strips(tokenizer):
    config = json.loads(tokenizer.backend_tokenizer.to_str())
    config["added_tokens"][2]["rstrip"] = True  # <|im_end|> would swallow the newline after it
    assert _byte_length_table(_plain_backend(_variant(tokenizer, **config))) is None
