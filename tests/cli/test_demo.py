"""The embedded demo: a tiny model learns the synthetic tasks from scratch, and the folder it saves
reloads with plain transformers. Runs the quick variant (about half a minute on two CPU cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatsft.demo.run import QUICK_ACCURACY_BAR, generate_answers, load_demo_tokenizer, run_demo
from chatsft.demo.tasks import TASKS, WORDS, make_rows


def _prompts(rows: list[dict]) -> set[str]:
    return {row["messages"][0]["content"] for row in rows}


def test_tasks_are_deterministic_and_split_without_overlap() -> None:
    train, held_out = make_rows(600, 90, seed=0)
    assert (train, held_out) == make_rows(600, 90, seed=0)
    assert len(train) == 600 and len(held_out) == 90
    assert len(_prompts(train)) == 600 and not _prompts(train) & _prompts(held_out)
    # The held-out part does not depend on how much training data is drawn.
    assert make_rows(60, 90, seed=0)[1] == held_out
    for task in TASKS:
        rows = [r for r in held_out if r["messages"][0]["content"].startswith(task.instruction)]
        assert len(rows) == 30
        for row in rows:
            payload = row["messages"][0]["content"].split(": ", 1)[1]
            assert row["messages"][1]["content"] == task.rule(payload)
    with pytest.raises(ValueError, match="distinct prompts"):
        make_rows(100_000, 0)


def test_tokenizer_keeps_payload_characters_apart() -> None:
    tokenizer = load_demo_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse: sorts"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nreverse: sorts<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[:4] == ["<|im_start|>", "user", "\n", "reverse"]
    # A payload is one token per character, even when it contains a word of the vocabulary
    # (payloads that are such a word are never generated).
    assert pieces[4:10] == [": ", "s", "o", "r", "t", "s"]
    assert pieces[-3:] == ["<|im_start|>", "assistant", "\n"]
    assert set(WORDS) <= set(tokenizer.get_vocab())
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_demo(str(tmp_path_factory.mktemp("demo")), quick=True)


@pytest.mark.slow
def test_quick_demo_learns_the_tasks(quick_run: dict) -> None:
    # Chance is about zero: a 4-character answer and the stop token must all be right.
    assert quick_run["accuracy_before"] <= 0.05
    assert quick_run["accuracy_after"] >= QUICK_ACCURACY_BAR
    assert quick_run["final_loss"] < quick_run["first_loss"] / 4
    assert quick_run["total_seconds"] > quick_run["train_seconds"] > 0
    assert quick_run["steps"] > 0 and len(quick_run["samples"]) == len(TASKS)


@pytest.mark.slow
def test_quick_demo_output_reloads_with_plain_transformers(quick_run: dict) -> None:
    out = Path(quick_run["output_dir"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_config.yaml"):
        assert (out / name).is_file(), name
    assert quick_run["reload_matches"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    samples = quick_run["samples"]
    prompts = [[{"role": "user", "content": s["prompt"]}] for s in samples]
    # Greedy decoding is deterministic: the reloaded model answers as the trained one did.
    assert generate_answers(model, tokenizer, prompts) == [s["answer"] for s in samples]
    _, held_out = make_rows(0, 60)
    answers = generate_answers(model, tokenizer, [row["messages"][:1] for row in held_out])
    hits = sum(a == row["messages"][1]["content"] for a, row in zip(answers, held_out))
    assert hits / len(held_out) >= QUICK_ACCURACY_BAR
