"""The decoding knob checks that need no model: torch-free import, lengths against the prompt and
the model's context, dtype names, and the package's public names."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from conftest import offline_env

from chatsft.errors import ChatSFTError
from chatsft.generation.knobs import DTYPES, check_dtype, check_knobs, fit_lengths


def test_knobs_module_imports_neither_torch_nor_transformers():
    code = (
        "import sys, chatsft.generation.knobs, chatsft.generation; "
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules)); "
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=offline_env()
    )
    assert result.returncode == 0, result.stderr


def fit(knobs: dict, lengths: list[int], context: int | None = 512) -> dict:
    given = {k: v for k, v in knobs.items() if v is not None}
    checked = check_knobs(given)
    return fit_lengths(checked, lengths, context, max_new_tokens_set="max_new_tokens" in given)


@pytest.mark.parametrize(
    "knobs, lengths, field, text",
    [
        (
            {"max_length": 2},
            [5],
            "max_length",
            "at least the prompt length + 1 = 6 (the prompt is 5",
        ),
        ({"max_length": 5}, [5], "max_length", "at least the prompt length + 1 = 6"),
        ({"max_length": 600}, [5], "max_length", "model's context (512 tokens"),
        ({"max_new_tokens": 600}, [5], "max_new_tokens", "leaves room for 507"),
        ({"max_new_tokens": 508}, [5], "max_new_tokens", "leaves room for 507"),
        ({}, [512], "prompt", "the prompt is 512 tokens, which fills the model's context"),
        ({"max_length": 12, "min_new_tokens": 8}, [5], "min_new_tokens", "the 7 new tokens"),
        ({"min_new_tokens": 200}, [400], "min_new_tokens", "the 112 new tokens"),
        ({"max_new_tokens": 4, "min_length": 10}, [5], "min_length", "(5 + 4)"),
        ({"max_length": 9}, [3, 9, 4], "max_length", "the prompt is 9 tokens"),
    ],
)
def test_lengths_are_checked_against_prompt_and_context(knobs, lengths, field, text):
    with pytest.raises(ChatSFTError) as err:
        fit(knobs, lengths)
    assert err.value.field == field and text in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    if len(lengths) > 1:
        assert err.value.row == 1  # the prompt that does not fit, by index


def test_lengths_that_fit_and_the_default_fitted_to_the_context():
    assert fit({"max_length": 6}, [5])["max_length"] == 6
    assert fit({"max_new_tokens": 507}, [5])["max_new_tokens"] == 507
    # Nobody asked for the default 256 new tokens: it shrinks to the room the context leaves.
    assert fit({}, [400])["max_new_tokens"] == 112
    assert fit({}, [5])["max_new_tokens"] == 256
    assert fit({"max_new_tokens": 10_000}, [5], context=None)["max_new_tokens"] == 10_000


def test_unknown_dtype_is_one_line_listing_the_choices():
    assert [check_dtype(d) for d in (*DTYPES, None)] == [*DTYPES, None]
    with pytest.raises(ChatSFTError) as err:
        check_dtype("fp8")
    message = str(err.value)
    assert err.value.field == "dtype" and "\n" not in message
    assert all(name in message for name in ("float32", "bfloat16", "float16", "auto"))


def test_public_names_resolve_to_what_they_name():
    import chatsft
    import chatsft.generation as generation
    import chatsft.generation.generate  # noqa: F401 - binds the submodule, as any importer does

    for name in generation.__all__:
        assert getattr(generation, name) is not None
    # `generate` and `estimate` name both a submodule and a function: the function is public.
    from chatsft import estimate, generate
    from chatsft.generation import generate as generate_too

    assert inspect.isfunction(generate) and generate is generate_too is generation.generate
    assert inspect.isfunction(estimate) and inspect.isfunction(chatsft.estimate)
    assert set(chatsft.__all__) <= set(dir(chatsft)) and set(generation.__all__) <= set(
        dir(generation)
    )
