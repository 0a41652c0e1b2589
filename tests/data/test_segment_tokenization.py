"""Masked rows are tokenized as one text, like inference sees it, with SentencePiece-style tokenizers.

Llama-2, Mistral and TinyLlama tokenizers put a word marker "▁" in front of every string tokenized
on its own. Tokenizing an assistant reply apart from the conversation around it would train on
"▁the" where the conversation has "the", and on a stray "▁" after "</s>". Byte-level tokenizers
(tests/test_masks.py) do not show this, so the tokenizer here is Metaspace-based, built offline from
an explicit vocabulary (no training, so the pinned tokens cannot drift).
"""

from __future__ import annotations

import random

import datasets
import pytest
from conftest import trained_mask_of

from chatsft.data.encode import PrepOptions
from chatsft.data.prepare import prepare_for_training
from chatsft.data.tokenize import _token_mask_unordered, token_mask, tokenize_segments
from chatsft.errors import ChatSFTError

SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
# "the" first: its merges then rank before those of "hello", so "the" is one token after "\n".
WORDS = ["the", "hello", "there", "answer", "is", "four", "what", "two", "plus"]
# Zephyr / TinyLlama-Chat.
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CHAT = [
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "the answer is four"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four"},
]


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A Llama-2-style fast tokenizer: BPE over words starting with "▁", Metaspace with
    prepend_scheme="first", a BOS post-processor. Each word is built by merging its prefixes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(set("".join(WORDS)) | set("▁\n?")):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    # Marked words first: their merges rank before any merge inside a word.
    for piece in ["▁" + w for w in WORDS] + WORDS:
        for k in range(2, len(piece) + 1):
            if (piece[: k - 1], piece[k - 1]) not in merges:
                merges.append((piece[: k - 1], piece[k - 1]))
            vocab.setdefault(piece[:k], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = ZEPHYR
    return fast


def prepare(rows, tokenizer, **kw):
    opts = PrepOptions(eos_token=tokenizer.eos_token, **kw)
    ds, _ = prepare_for_training(datasets.Dataset.from_list(rows), tokenizer, opts)
    return ds


def tokens_and_mask(tokenizer, row) -> list[tuple[str, bool]]:
    return list(zip(tokenizer.convert_ids_to_tokens(row["input_ids"]), trained_mask_of(row)))


def test_the_tokenizer_marks_separately_tokenized_strings(sp_tokenizer):
    # The premise: tokenized alone, a reply and the newline after "</s>" gain a "▁".
    assert sp_tokenizer.tokenize("the answer") == ["▁the", "▁answer"]
    assert sp_tokenizer.tokenize("\n") == ["▁", "\n"]


@pytest.mark.parametrize(
    "options",
    [{}, {"assistant_only_loss": True}, {"last_turn_only": True}],
    ids=["all", "assistant_only", "last_turn_only"],
)
def test_chat_ids_are_the_rendered_text_tokenized_once(sp_tokenizer, options):
    row = prepare([{"messages": CHAT}], sp_tokenizer, **options)[0]
    text = sp_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert row["input_ids"] == sp_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sp_tokenizer.decode(row["input_ids"]) == text


def test_assistant_only_mask_pinned(sp_tokenizer):
    row = prepare([{"messages": CHAT[:2]}], sp_tokenizer, assistant_only_loss=True)[0]
    assert tokens_and_mask(sp_tokenizer, row) == [
        ("<|user|>", False),
        ("\n", False),
        ("hello", False),
        ("▁there", False),
        ("</s>", False),
        ("\n", False),
        ("<|assistant|>", False),
        ("\n", False),
        ("the", True),
        ("▁answer", True),
        ("▁is", True),
        ("▁four", True),
        ("</s>", True),
        ("\n", False),  # after the end-of-turn token: generation has stopped
    ]


def test_prompt_completion_ids_and_mask_pinned(sp_tokenizer):
    row = prepare([{"prompt": "what is two plus two?", "completion": " four"}], sp_tokenizer)[0]
    text = "what is two plus two? four</s>"
    assert row["input_ids"] == sp_tokenizer(text)["input_ids"]  # with the BOS, as inference has
    assert tokens_and_mask(sp_tokenizer, row) == [
        ("<s>", False),
        ("▁what", False),
        ("▁is", False),
        ("▁two", False),
        ("▁plus", False),
        ("▁two", False),
        ("?", False),
        ("▁four", True),  # one "▁", not the "▁▁four" of " four" tokenized alone
        ("</s>", True),
    ]
    everything = prepare(
        [{"prompt": "what is two plus two?", "completion": " four"}],
        sp_tokenizer,
        completion_only_loss=False,
    )[0]
    assert everything["input_ids"] == row["input_ids"]
    assert trained_mask_of(everything) == [False] + [True] * (len(row["input_ids"]) - 1)


def test_a_token_straddling_prompt_and_completion_is_trained(sp_tokenizer):
    # The prompt's trailing space and the completion's first word become the one token "▁four".
    row = prepare([{"prompt": "what is two plus two? ", "completion": "four"}], sp_tokenizer)[0]
    assert row["input_ids"] == sp_tokenizer("what is two plus two? four</s>")["input_ids"]
    assert tokens_and_mask(sp_tokenizer, row)[-3:] == [
        ("?", False),
        ("▁four", True),
        ("</s>", True),
    ]


def test_conversational_prompt_completion_pinned(sp_tokenizer):
    rows = [{"prompt": CHAT[:1], "completion": CHAT[1:2]}]
    row = prepare(rows, sp_tokenizer, completion_only_loss=True)[0]
    text = sp_tokenizer.apply_chat_template(CHAT[:2], tokenize=False)
    assert row["input_ids"] == sp_tokenizer(text, add_special_tokens=False)["input_ids"]
    trained = [t for t, m in tokens_and_mask(sp_tokenizer, row) if m]
    assert trained == ["the", "▁answer", "▁is", "▁four", "</s>"]


# --- the mask rule and the fallback, directly ---------------------------------------------------


def test_token_mask_rule():
    spans = [(3, 6)]  # characters 3, 4, 5 are trained
    offsets = [(0, 3), (3, 4), (4, 4), (4, 6), (6, 8)]
    assert token_mask(offsets, spans) == [False, True, True, True, False]
    # Straddling either end: trained. No characters of its own: follows the next character.
    assert token_mask([(0, 4), (5, 7)], spans) == [True, True]
    assert token_mask([(0, 3), (3, 3), (6, 6), (6, 7)], spans) == [False, True, False, False]
    assert token_mask([(0, 1), (0, 1), (1, 3)], [(0, 1)]) == [True, True, False]  # "▁", "\n"


def test_token_mask_ordered_path_equals_the_per_token_rule():
    rng = random.Random(0)
    for _ in range(500):
        cuts = sorted(rng.sample(range(1, 40), rng.randint(1, 8)))
        offsets, pos = [], 0
        for cut in cuts:
            offsets.append((pos, cut))
            if rng.random() < 0.2:
                offsets.append((cut, cut))  # no characters of its own
            pos = cut
        bounds = sorted(rng.sample(range(0, 41), 2 * rng.randint(0, 3)))
        spans = [(a, b) for a, b in zip(bounds[::2], bounds[1::2]) if a < b]
        assert token_mask(offsets, spans) == _token_mask_unordered(offsets, spans)
    unordered = [(2, 4), (0, 2), (4, 6)]
    assert token_mask(unordered, [(0, 2)]) == [False, True, False]


class OffsetsUnavailable:
    """A fast tokenizer seen as a slow one: ids only, no character offsets."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self.tokenizer(texts, **kwargs)


def test_without_offsets_segments_are_used_only_where_they_join_exactly(tokenizer, sp_tokenizer):
    segments = [[("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False)]]
    segments[0] += [("yo<|im_end|>", True), ("\n", False)]
    # Byte-level: the pieces join into the whole text's ids; the same result as with offsets.
    assert tokenize_segments(OffsetsUnavailable(tokenizer), segments) == tokenize_segments(
        tokenizer, segments
    )
    sp_segments = [[("<|user|>\nhello</s>\n<|assistant|>\n", False), ("the answer</s>", True)]]
    with pytest.raises(ChatSFTError, match="row 7.*fast tokenizer"):
        tokenize_segments(OffsetsUnavailable(sp_tokenizer), sp_segments, rows=[7])
