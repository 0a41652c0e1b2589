"""Where TRL 1.16 users rely on a behaviour, chatsft behaves the same: dtype default, evaluation on raw
sets, errors, tags, MoE attributes."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import chats, make_model
from conftest import sft_config as config

from chatsft import ChatSFTError, SFTTrainer


@pytest.fixture()
def bf16_model_dir(tmp_path, tokenizer):
    """A model saved in bfloat16, as most hub checkpoints are (Qwen2.5, Llama 3, ...)."""
    path = tmp_path / "bf16-model"
    make_model(tokenizer).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_model_saved_in_bf16_trains_in_fp32_and_every_weight_moves(tmp_path, bf16_model_dir):
    trainer = SFTTrainer(
        model=bf16_model_dir,
        args=config(tmp_path),  # lr 2e-5: bf16 weights would round most updates away
        train_dataset=datasets.Dataset.from_list(chats(8)),
    )
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} has not changed"


def test_bf16_weights_on_request_and_the_log_says_what_it_costs(tmp_path, bf16_model_dir, capsys):
    trainer = SFTTrainer(
        model=bf16_model_dir,
        args=config(tmp_path, model_init_kwargs={"dtype": "bfloat16"}),
        train_dataset=datasets.Dataset.from_list(chats(8)),
    )
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    out = capsys.readouterr().out
    assert "trainable weights are bfloat16" in out and "1/256" in out
    # "auto" keeps from_pretrained's rule: the dtype the model was saved in.
    trainer = SFTTrainer(
        model=bf16_model_dir,
        args=config(tmp_path, model_init_kwargs={"dtype": "auto"}),
        train_dataset=datasets.Dataset.from_list(chats(8)),
    )
    assert next(trainer.model.parameters()).dtype == torch.bfloat16


def test_fp32_weights_log_no_precision_warning(tmp_path, model_dir, capsys):
    SFTTrainer(
        model=model_dir, args=config(tmp_path), train_dataset=datasets.Dataset.from_list(chats(4))
    )
    assert "trainable weights are" not in capsys.readouterr().out


def test_estimate_assumes_the_same_fp32_default(bf16_model_dir):
    from chatsft import estimate

    assert estimate(bf16_model_dir, max_length=32, batch_size=1).settings["dtype"] == "float32"
    auto = estimate(bf16_model_dir, max_length=32, batch_size=1, dtype="auto")
    assert auto.settings["dtype"] == "bfloat16"


def _eval_set(kind: str):
    rows = [{"text": "the cat sat on a mat"}, {"text": "what is two plus three"}] * 3
    plain = datasets.Dataset.from_list(rows)
    if "iterable" in kind:
        plain = plain.to_iterable_dataset()
    if kind in ("dataset", "iterable_dataset"):
        return plain
    if kind.endswith("dataset_dict"):
        cls = datasets.IterableDatasetDict if "iterable" in kind else datasets.DatasetDict
        return cls({"data1": plain, "data2": plain})
    return {"data1": plain, "data2": plain}


@pytest.mark.parametrize(
    "kind",
    [
        "dataset",
        "iterable_dataset",
        "dataset_dict",
        "iterable_dataset_dict",
        "dict_of_dataset",
        "dict_of_iterable_dataset",
    ],
)
def test_evaluate_prepares_a_raw_eval_set_of_every_kind(tmp_path, model_dir, kind):
    trainer = SFTTrainer(
        model=model_dir,
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(chats(8)),
    )
    metrics = trainer.evaluate(eval_dataset=_eval_set(kind))
    if kind in ("dataset", "iterable_dataset"):
        assert metrics["eval_loss"] > 0
    else:
        assert metrics["eval_data1_loss"] > 0 and metrics["eval_data2_loss"] > 0
        assert metrics["eval_data1_loss"] == pytest.approx(metrics["eval_data2_loss"])


def test_evaluate_on_a_raw_set_equals_evaluate_on_it_given_at_init(tmp_path, model_dir):
    rows = datasets.Dataset.from_list(chats(6, seed=3))
    trainer = SFTTrainer(
        model=model_dir,
        args=config(tmp_path, packing=True),
        train_dataset=datasets.Dataset.from_list(chats(8)),
        eval_dataset={"held": rows},
    )
    at_init = trainer.evaluate()["eval_held_loss"]
    # A second evaluate over the prepared dict must not pack its packed rows again.
    assert trainer.evaluate()["eval_held_loss"] == pytest.approx(at_init)
    assert trainer.evaluate(eval_dataset=rows)["eval_loss"] == pytest.approx(at_init)


def test_train_dataset_is_required_and_must_be_one_split(tmp_path, model_dir):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        SFTTrainer(model=model_dir, args=config(tmp_path))
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(chats(2))})
    with pytest.raises(TypeError, match="must be a `Dataset` or `IterableDataset`.*\\['train'\\]"):
        SFTTrainer(model=model_dir, args=config(tmp_path), train_dataset=both)


def test_a_dataset_with_a_transform_is_refused(tmp_path, model_dir):
    rows = datasets.Dataset.from_list(chats(4)).with_transform(lambda batch: batch)
    with pytest.raises(ChatSFTError, match="with_transform.*skip_prepare_dataset"):
        SFTTrainer(model=model_dir, args=config(tmp_path), train_dataset=rows)


def test_skip_prepare_with_masks_but_no_labels_is_refused(tmp_path, model_dir, tokenizer):
    rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}] * 4)
    with pytest.raises(ChatSFTError, match="Add a 'labels' column"):
        SFTTrainer(
            model=model_dir,
            args=config(tmp_path, dataset_kwargs={"skip_prepare_dataset": True}),
            train_dataset=rows,
            data_collator=lambda batch: batch,
        )


@pytest.mark.parametrize("peft", [False, True])
def test_model_tags(tmp_path, model_dir, peft):
    from peft import LoraConfig

    trainer = SFTTrainer(
        model=model_dir,
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(chats(4)),
        peft_config=LoraConfig(target_modules="all-linear") if peft else None,
    )
    assert {"chatsft", "sft"} <= set(trainer.model.model_tags)


def test_aux_loss_enabled_follows_the_router_coefficient(tmp_path, model_dir):
    trainer = SFTTrainer(
        model=model_dir, args=config(tmp_path), train_dataset=datasets.Dataset.from_list(chats(4))
    )
    assert trainer.aux_loss_enabled is False


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_loss_equals_peft_full_logit_loss_and_trains(tmp_path, tokenizer, kind):
    """Virtual tokens shift the logits: the supervised loss must still score the right ones."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    from chatsft.model.loss import supervised_loss

    cls = PromptTuningConfig if kind == "prompt_tuning" else PrefixTuningConfig
    model = get_peft_model(
        make_model(tokenizer), cls(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    )
    trainer = SFTTrainer(
        model=model,
        args=config(tmp_path, max_steps=3, learning_rate=1e-2),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(12)),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" not in batch  # padded rows: peft ignores position_ids
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    parts, _ = supervised_loss(trainer.model, inputs, batch["labels"])
    reference = trainer.model(**batch).loss  # peft's own loss over every logit
    torch.testing.assert_close(parts.loss_sum / parts.num_tokens, reference)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))  # the model card describes any peft method
    assert kind.upper() in (tmp_path / "saved" / "README.md").read_text()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history[:-1])
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(before[name], p.detach()), name


def test_prompt_tuning_refuses_packing(tmp_path, tokenizer):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = get_peft_model(
        make_model(tokenizer),
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2),
    )
    with pytest.raises(ChatSFTError, match="prompt-learning"):
        SFTTrainer(
            model=model,
            args=config(tmp_path, packing=True),
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(chats(4)),
        )


def test_a_peft_model_of_a_saved_model_finds_its_tokenizer(tmp_path, model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig())
    trainer = SFTTrainer(
        model=model, args=config(tmp_path), train_dataset=datasets.Dataset.from_list(chats(4))
    )
    assert trainer.processing_class.name_or_path == model_dir


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t['function']['name'] }} "
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not enable_thinking %}what is {% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("as_json_string", [True, False])
def test_tools_and_chat_template_kwargs_columns_reach_the_template(
    tmp_path, model_dir, tokenizer, as_json_string
):
    import json

    tokenizer.chat_template = TOOLS_TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tools = json.dumps([WEATHER]) if as_json_string else [WEATHER]
    row = {"messages": messages, "tools": tools, "chat_template_kwargs": {"enable_thinking": True}}
    trainer = SFTTrainer(
        model=model_dir,
        args=config(tmp_path),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list([row] * 2),
    )
    expected = tokenizer.apply_chat_template(
        messages, tools=[WEATHER], enable_thinking=True, tokenize=False
    )
    assert "weather" in expected and "what is" not in expected
    want = tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert trainer.train_dataset[0]["input_ids"] == want


def test_tools_that_are_not_json_name_the_row_and_field(tmp_path, model_dir):
    rows = chats(3)
    rows = [{**r, "tools": "[{not json"} for r in rows]
    with pytest.raises(ChatSFTError, match="row 1.*field 'tools'.*not JSON"):
        SFTTrainer(
            model=model_dir,
            args=config(tmp_path),
            train_dataset=datasets.Dataset.from_list(rows),
        )


def test_prepared_rows_have_trls_layout_input_ids_and_labels(tmp_path, model_dir, tokenizer):
    row = {"prompt": "what is two plus three", "completion": " five"}
    trainer = SFTTrainer(
        model=model_dir, args=config(tmp_path), train_dataset=datasets.Dataset.from_list([row])
    )
    prepared = trainer.train_dataset
    assert prepared.column_names == ["input_ids", "labels"]
    n_prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    ids, labels = prepared[0]["input_ids"], prepared[0]["labels"]
    assert labels == [-100] * n_prompt + ids[n_prompt:]  # completion and EOS trained
    packed = SFTTrainer(
        model=model_dir,
        args=config(tmp_path, packing=True),
        train_dataset=datasets.Dataset.from_list([row, row]),
    ).train_dataset
    assert packed.column_names == ["input_ids", "labels", "seq_lengths"]
    assert packed[0]["labels"] == labels + labels and packed[0]["seq_lengths"] == [len(ids)] * 2


def test_pretokenized_labels_are_used_as_given_and_truncated(tmp_path, model_dir):
    rows = [
        # Labels that differ from the ids are kept: they are the targets.
        {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, 70, 80, 90, 100]},
        # Everything trained sits past max_length: nothing left to train, dropped and counted.
        {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100] * 5 + [10]},
        {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
    ]
    columns = {
        key: [r.get(key) for r in rows] for key in ("input_ids", "labels", "completion_mask")
    }
    trainer = SFTTrainer(
        model=model_dir,
        args=config(tmp_path, max_length=4),
        train_dataset=datasets.Dataset.from_dict(columns),
    )
    prepared = trainer.train_dataset
    assert prepared["input_ids"] == [[5, 6, 7, 8], [5, 6, 7]]
    assert prepared["labels"] == [[-100, -100, 70, 80], [-100, 6, 7]]
    assert trainer.prep_stats["train"].dropped == {"no trained token left": 1}
    batch = trainer.data_collator([prepared[0]])
    assert batch["labels"].tolist() == [[-100, -100, 70, 80]]


def test_model_configs_follow_the_tokenizers_pad_and_given_eos(tmp_path, tokenizer):
    model = make_model(tokenizer)
    model.config.pad_token_id = None
    model.generation_config.eos_token_id = 7
    trainer = SFTTrainer(
        model=model,
        args=config(tmp_path, eos_token="<|im_start|>"),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(4)),
    )
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert trainer.model.config.pad_token_id == tokenizer.pad_token_id
    assert trainer.model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert trainer.model.config.eos_token_id == start
    assert trainer.model.generation_config.eos_token_id == [start, 7]  # added, not replaced


def test_router_aux_loss_coef_attribute(tmp_path, tokenizer):
    trainer = SFTTrainer(
        model=make_model(tokenizer),
        args=config(tmp_path),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(4)),
    )
    assert trainer.router_aux_loss_coef == 0.0 and trainer.aux_loss_enabled is False


def test_a_chat_template_from_another_tokenizer_brings_its_special_tokens(tmp_path, tokenizer):
    """TRL's chat_template_path may name a tokenizer folder or hub id: its template, the special
    tokens it uses (the embeddings grow) and its EOS."""
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    source.add_special_tokens({"additional_special_tokens": ["<|turn|>"]})
    source.eos_token = "<|turn|>"
    source.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|turn|>{% endfor %}"
    )
    source.save_pretrained(tmp_path / "source-tokenizer")
    model = make_model(tokenizer)
    rows = 64 * -(-(len(tokenizer) + 1) // 64)
    trainer = SFTTrainer(
        model=model,
        args=config(tmp_path, chat_template_path=str(tmp_path / "source-tokenizer")),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(4)),
    )
    turn = trainer.processing_class.convert_tokens_to_ids("<|turn|>")
    assert trainer.processing_class.eos_token == "<|turn|>" and turn == len(tokenizer) - 1
    assert trainer.model.get_input_embeddings().num_embeddings == rows
    assert turn in trainer.train_dataset[0]["input_ids"]
    trainer.train()


def test_lora_weights_are_seeded_by_args_seed(tmp_path, model_dir):
    from peft import LoraConfig

    def lora_a():
        trainer = SFTTrainer(
            model=model_dir,
            args=config(tmp_path, seed=3),
            train_dataset=datasets.Dataset.from_list(chats(4)),
            peft_config=LoraConfig(target_modules=["q_proj"]),
        )
        return next(p for n, p in trainer.model.named_parameters() if "lora_A" in n).detach()

    torch.manual_seed(1)
    first = lora_a()
    torch.manual_seed(2)
    assert torch.equal(first, lora_a())


def test_skip_prepare_dataset_with_labels_uses_the_default_collator(tmp_path, model_dir):
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}, {"input_ids": [9, 10, 11]}]
    columns = {
        "input_ids": [r["input_ids"] for r in rows],
        "labels": [r.get("labels") for r in rows],
    }
    trainer = SFTTrainer(
        model=model_dir,
        args=config(tmp_path, dataset_kwargs={"skip_prepare_dataset": True}, padding_free=False),
        train_dataset=datasets.Dataset.from_dict(columns),
    )
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    # A row without labels trains every token (as TRL's collator), its first label masked.
    assert batch["labels"].tolist() == [[-100, 6, 7, 8], [-100, 10, 11, -100]]
    trainer.train()


def test_image_datasets_are_refused_with_trls_wording(tmp_path, model_dir):
    rows = [{"messages": chats(1)[0]["messages"], "images": ["a.png"]}]
    with pytest.raises(ValueError, match="vision-related.*vision-language model"):
        SFTTrainer(
            model=model_dir, args=config(tmp_path), train_dataset=datasets.Dataset.from_list(rows)
        )


def test_chunked_nll_is_a_deprecated_alias(tmp_path):
    with pytest.warns(FutureWarning, match="chunked_nll"):
        assert config(tmp_path, loss_type="chunked_nll").loss_type == "nll"


def test_bf16_default_follows_the_hardware(tmp_path):
    """TRL's default is bf16 unless fp16; chatsft takes it where a GPU has bf16 (none here)."""
    assert config(tmp_path).bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert config(tmp_path, fp16=False, bf16=False).bf16 is False


def test_packing_with_a_hub_kernel_attention_does_not_run_a_probe(tmp_path, tokenizer, monkeypatch):
    """Attention implementations other than SDPA/eager (flash kernels, the hub's) read document
    boundaries from position_ids; only the dense-mask path is checked by running the model."""
    import chatsft.model.attention as attention

    model = make_model(tokenizer)
    model.config._attn_implementation = "kernels-community/flash-attn2"
    monkeypatch.setattr(attention, "keeps_documents_apart", lambda m: pytest.fail("probed"))
    assert attention.shared_rows_refusal(model) is None
