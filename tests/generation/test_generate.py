"""Generation: decoding knobs, batching, the chat REPL, `chatsft generate`, adapters, eval samples."""

from __future__ import annotations

import io
import json
import types

import datasets
import pytest
import torch
from conftest import WORDS, chats, make_model

from chatsft import ChatSFTError, SFTConfig, SFTTrainer
from chatsft.generation.callback import (
    GenerationEvalCallback,
    generation_eval_callback_from_config,
)
from chatsft.generation.chat import ChatSession, run_repl
from chatsft.generation.cli import (
    build_chat_parser,
    build_generate_parser,
    cmd_chat,
    cmd_generate,
)
from chatsft.generation.generate import generate, load_for_inference
from chatsft.generation.knobs import check_knobs

USER = [{"role": "user", "content": "what is two plus three"}]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def repeater(tokenizer):
    """A model trained (plain torch, ~0.2 s) to continue 'w w w' with w forever."""
    model = make_model(tokenizer)
    rows = torch.tensor([tokenizer(" ".join([w] * 12))["input_ids"][:12] for w in WORDS])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(25):
        model(input_ids=rows, labels=rows).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def cli(*argv: str) -> int:
    """`chatsft generate|chat ARGS` through the command's parser, raising ChatSFTError."""
    command, *rest = argv
    build, run = {
        "generate": (build_generate_parser, cmd_generate),
        "chat": (build_chat_parser, cmd_chat),
    }[command]
    (args,) = build().parse_args_into_dataclasses(rest)
    return run(args)


# --- decoding --------------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_batching_changes_nothing(model, tokenizer):
    prompts = ["the cat sat", USER, "hi"]  # different lengths: left padding in the batch
    tokenizer.padding_side = "right"
    model.train()
    batched = [r.text for r in generate(model, tokenizer, prompts, max_new_tokens=8)]
    again = [r.text for r in generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)]
    alone = [generate(model, tokenizer, [p], max_new_tokens=8)[0].text for p in prompts]
    assert batched == again == alone
    assert tokenizer.padding_side == "right" and model.training  # both restored


def test_top_k_1_sampling_equals_greedy_and_seed_leaves_caller_rng(model, tokenizer):
    greedy = generate(model, tokenizer, [USER], max_new_tokens=8)[0].text
    assert (
        generate(model, tokenizer, [USER], max_new_tokens=8, do_sample=True, top_k=1)[0].text
        == greedy
    )
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    knobs = dict(max_new_tokens=8, temperature=1.5, num_return_sequences=3, seed=7)
    first = [g.text for g in generate(model, tokenizer, [USER], **knobs)[0].generations]
    second = [g.text for g in generate(model, tokenizer, [USER], **knobs)[0].generations]
    assert first == second and len(set(first)) > 1  # reproducible, and really sampled
    assert torch.equal(torch.rand(1), expected_next)


def test_unset_knobs_follow_the_models_generation_config(model, tokenizer):
    """No knobs: the model's own generation_config decides (here: it samples); temperature 0
    still means greedy."""
    greedy = generate(model, tokenizer, [USER], max_new_tokens=12)[0].text
    model.generation_config.do_sample = True
    model.generation_config.temperature = 2.0
    try:
        sampled = {
            generate(model, tokenizer, [USER], max_new_tokens=12, seed=s)[0].text for s in range(4)
        }
        assert len(sampled) > 1
        assert generate(model, tokenizer, [USER], max_new_tokens=12, temperature=0)[0].text == (
            greedy
        )
    finally:
        model.generation_config.do_sample = False
        model.generation_config.temperature = 1.0


def test_beam_search_returns_distinct_scored_beams(model, tokenizer):
    results = generate(
        model, tokenizer, ["the cat", USER], max_new_tokens=6, num_beams=4, num_return_sequences=3
    )
    for result in results:
        beams = result.generations
        assert len(beams) == 3
        assert len({tuple(b.token_ids) for b in beams}) == 3
        scores = [b.score for b in beams]
        assert all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)


def test_repetition_penalty_and_no_repeat_ngram_break_a_loop(repeater, tokenizer):
    plain = generate(repeater, tokenizer, ["dog dog"], max_new_tokens=10)[0].text
    assert plain.split() == ["dog"] * 10
    penalised = generate(
        repeater, tokenizer, ["dog dog"], max_new_tokens=10, repetition_penalty=5.0
    )
    assert penalised[0].text.split().count("dog") < 5
    no_repeat = generate(
        repeater, tokenizer, ["dog dog"], max_new_tokens=10, no_repeat_ngram_size=2
    )
    ids = no_repeat[0].generations[0].token_ids
    assert len(set(zip(ids, ids[1:]))) == len(ids) - 1


def test_min_new_tokens_holds_back_eos(model, tokenizer):
    # Make EOS the argmax everywhere: a bias on the LM head (Llama's has none; add one).
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[tokenizer.eos_token_id] = 50.0
    model.lm_head = head
    quick = generate(model, tokenizer, [USER], max_new_tokens=10)[0].generations[0]
    assert quick.token_ids == [] and quick.finish_reason == "eos"
    held = generate(model, tokenizer, [USER], max_new_tokens=10, min_new_tokens=5)
    assert len(held[0].generations[0].token_ids) == 5
    assert held[0].generations[0].finish_reason == "eos"


def test_stop_strings_end_generation_and_cut_the_text(repeater, tokenizer):
    out = generate(repeater, tokenizer, ["dog dog"], max_new_tokens=10, stop_strings=["g d"])
    gen = out[0].generations[0]
    assert (gen.text, gen.finish_reason) == (" do", "stop_string")
    # The first new token already makes "dog dog| dog" contain "g d", but that match starts in the
    # prompt: only the generated text counts, so generation stops at the second token.
    assert len(gen.token_ids) == 2
    unseen = generate(repeater, tokenizer, ["dog dog"], max_new_tokens=4, stop_strings="zebra")
    assert unseen[0].generations[0].finish_reason == "length"


@pytest.mark.parametrize(
    "knobs, field",
    [
        ({"top_pp": 0.9}, "top_pp"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"temperature": 0, "do_sample": True}, "temperature"),
        ({"temperature": 0.7, "do_sample": False}, "temperature"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_return_sequences": 2}, "num_return_sequences"),
        ({"length_penalty": 2.0}, "length_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens"),
        ({"max_length": 9, "max_new_tokens": 4}, "max_length"),
        ({"stop_strings": [""]}, "stop_strings"),
        ({"early_stopping": "sometimes", "num_beams": 2}, "early_stopping"),
    ],
)
def test_bad_knobs_name_the_knob(knobs, field, model, tokenizer):
    with pytest.raises(ChatSFTError) as err:
        generate(model, tokenizer, ["hi"], **knobs)
    assert err.value.field == field and field in str(err.value)


def test_knob_values_from_text_and_conventions():
    assert "did you mean 'top_p'" in str(
        pytest.raises(ChatSFTError, check_knobs, {"top_pp": 1}).value
    )
    knobs = check_knobs({"top_p": "0.9", "top_k": "5", "stop": "###", "seed": None})
    assert knobs == {
        "top_p": 0.9,
        "top_k": 5,
        "stop_strings": ["###"],
        "do_sample": True,
        "max_new_tokens": 256,
    }
    assert check_knobs({"temperature": 0}) == {"do_sample": False, "max_new_tokens": 256}
    assert check_knobs({"num_beams": "3", "early_stopping": "never", "max_length": 50}) == {
        "num_beams": 3,
        "early_stopping": "never",
        "max_length": 50,
        "do_sample": False,
    }


# --- chat ------------------------------------------------------------------------------------------


def test_chat_repl_keeps_history_resets_and_validates_knobs(model, tokenizer):
    session = ChatSession(model, tokenizer, {"max_new_tokens": 4}, system="be brief")
    lines = "hi yo\nwhat is two\n/set top_p 2\n/set top_pp 0.5\n/set top_p 0.5\n/reset\nthe cat\n/quit\nnot read\n"
    stdout = io.StringIO()
    seen: list[int] = []
    send = session.send
    session.send = lambda text: seen.append(len(session.messages())) or send(text)
    assert run_repl(session, io.StringIO(lines), stdout) == 0
    assert seen == [1, 3, 1]  # system (+ earlier turns) sent along; /reset dropped the history
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["the cat"]
    out = stdout.getvalue()
    assert "error: field 'top_p': must be > 0 and <= 1" in out
    assert "did you mean 'top_p'" in out and "not read" not in out
    assert session.knobs["top_p"] == 0.5 and session.knobs["do_sample"] is True
    session.update_knobs({"top_p": "none"})
    assert "top_p" not in session.knobs and "do_sample" not in session.knobs


def test_chat_command_reads_stdin(model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/system be nice\n/reset\n"))
    assert cli("chat", model_dir, "--max-new-tokens", "3") == 0
    out = capsys.readouterr().out
    assert "[chat] system message set" in out and "[chat] conversation cleared" in out


# --- CLI and loading -------------------------------------------------------------------------------


def test_generate_command_writes_jsonl_with_knobs(tmp_path, model_dir):
    rows = [
        {"id": 1, "prompt": "the cat"},
        {"messages": [*USER, {"role": "assistant", "content": "five"}]},
        {"prompt": USER},
    ]
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out" / "gen.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    knobs = ["--max_new_tokens", "4", "--num_beams", "2", "--num_return_sequences", "2"]
    assert cli("generate", model_dir, "--input", str(src), "--output", str(out), *knobs) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and records[0]["id"] == 1
    assert records[0]["prompt"] == [{"role": "user", "content": "the cat"}]  # chat template used
    assert records[1]["prompt"] == USER  # the reference answer is not part of the prompt
    for record in records:
        assert record["knobs"] == {
            "max_new_tokens": 4,
            "num_beams": 2,
            "num_return_sequences": 2,
            "do_sample": False,
        }
        assert len(record["generations"]) == 2
        assert {"text", "num_tokens", "finish_reason", "score"} <= set(record["generations"][0])
    assert sorted(p.name for p in out.parent.iterdir()) == ["gen.jsonl"]  # no temp file left


def test_generate_command_prompt_and_errors(tmp_path, model_dir, capsys):
    assert cli("generate", model_dir, "--prompt", "hi", "--max-new-tokens", "3", "--raw") == 0
    assert capsys.readouterr().out.strip() != ""
    src, out = tmp_path / "bad.jsonl", tmp_path / "gen.jsonl"
    src.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ChatSFTError, match="row 2"):
        cli("generate", model_dir, "--input", str(src), "--output", str(out))
    with pytest.raises(ChatSFTError) as err:
        cli("generate", model_dir, "--prompt", "hi", "--top-p", "1.5")
    assert err.value.field == "top_p" and not out.exists()


def test_lora_adapter_folder_loads_on_its_base(tmp_path, model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():  # LoRA starts as a no-op; give it an effect to check it is applied
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    tuned.save_pretrained(adapter)  # no tokenizer here: it comes from the base folder
    model, tokenizer = load_for_inference(str(adapter), device="cpu")
    assert isinstance(model, PeftModel) and tokenizer.chat_template
    expected = generate(tuned, tokenizer, [USER], max_new_tokens=6)[0].text
    assert generate(model, tokenizer, [USER], max_new_tokens=6)[0].text == expected
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    assert generate(plain, tokenizer, [USER], max_new_tokens=6)[0].text != expected


# --- sample generations during training ------------------------------------------------------------


def test_eval_callback_records_once_per_step_and_restores_train_mode(tmp_path, model, tokenizer):
    callback = GenerationEvalCallback(["the cat", USER], tokenizer, max_new_tokens=3)
    state = types.SimpleNamespace(global_step=5, epoch=1.0, is_world_process_zero=True)
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    model.train()
    for _ in range(2):  # two eval sets at the same step: one set of samples
        callback.on_evaluate(args, state, None, model=model)
    assert model.training
    records = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in records] == [(5, "the cat"), (5, USER)]


def test_generation_eval_during_training(tmp_path, tokenizer, model):
    rows = chats(8)
    callback = generation_eval_callback_from_config(
        {"num_prompts": 2, "max_new_tokens": 3}, datasets.Dataset.from_list(rows), tokenizer
    )
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        max_length=64,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        processing_class=tokenizer,
        callbacks=[callback],
        train_dataset=datasets.Dataset.from_list(rows),
        eval_dataset=datasets.Dataset.from_list(rows),
    )
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    last_turn = max(i for i, m in enumerate(rows[0]["messages"]) if m["role"] == "assistant")
    assert records[0]["prompt"] == rows[0]["messages"][:last_turn]
    assert all(isinstance(r["completion"], str) for r in records)


def test_generation_eval_config_errors():
    with pytest.raises(ChatSFTError, match="did you mean 'generation_eval.num_prompts'"):
        generation_eval_callback_from_config({"num_promts": 2}, [], None)
    with pytest.raises(ChatSFTError) as err:
        generation_eval_callback_from_config({"prompts": ["hi"], "top_p": 3}, None, None)
    assert err.value.field == "generation_eval.top_p"
    with pytest.raises(ChatSFTError, match="no prompts and no eval_dataset"):
        generation_eval_callback_from_config({}, None, None)
    rows = [{"prompt": "2+2=", "completion": "4"}, {"text": "plain"}]
    callback = generation_eval_callback_from_config({"num_prompts": 3}, rows[:1], None)
    assert callback.prompts == ["2+2="]
    as_chat = generation_eval_callback_from_config(
        {"num_prompts": 1},
        [{"q": "hi", "a": "yo"}],
        None,
        formatting_func=lambda r: [
            {"role": "user", "content": r["q"]},
            {"role": "assistant", "content": r["a"]},
        ],
    )
    assert as_chat.prompts == [[{"role": "user", "content": "hi"}]]


def test_eval_callback_checks_lengths_before_the_first_step(model, tokenizer):
    args = types.SimpleNamespace(output_dir="unused")
    short = GenerationEvalCallback(["the cat sat on the mat"], tokenizer, max_length=3)
    with pytest.raises(ChatSFTError, match="field 'max_length': must be at least the prompt"):
        short.on_train_begin(args, None, None, model=model)
    too_long = GenerationEvalCallback([USER, "hi"], max_new_tokens=600)
    with pytest.raises(ChatSFTError) as err:
        too_long.on_train_begin(args, None, None, model=model, processing_class=tokenizer)
    assert (err.value.row, err.value.field) == (0, "max_new_tokens")
    GenerationEvalCallback([USER], tokenizer).on_train_begin(args, None, None, model=model)
