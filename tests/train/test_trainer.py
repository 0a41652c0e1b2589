"""The drop-in API: TRL's quickstart pattern with only the import changed, on local models."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from conftest import CountSyncs, chats, make_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from chatsft import ChatSFTError, SFTConfig, SFTTrainer


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=64,
    )
    base.update(kw)
    return SFTConfig(**base)


def test_trl_quickstart_pattern_on_a_local_model(tmp_path, model_dir):
    # TRL's quickstart: SFTTrainer(model="id", train_dataset=dataset) then trainer.train().
    dataset = datasets.Dataset.from_list(chats(16))
    trainer = SFTTrainer(model=model_dir, args=args(tmp_path), train_dataset=dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        assert p.requires_grad
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert {
        "loss",
        "learning_rate",
        "grad_norm",
        "num_trained_tokens",
        "mean_token_accuracy",
    } <= set(logs[-1])
    assert logs[-1]["num_trained_tokens"] > logs[0]["num_trained_tokens"] > 0


def test_saved_folder_reloads_with_plain_transformers_and_generates(tmp_path, model_dir):
    dataset = datasets.Dataset.from_list(chats(8))
    trainer = SFTTrainer(model=model_dir, args=args(tmp_path, max_steps=1), train_dataset=dataset)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "model.safetensors").exists() and (out / "training_config.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "im_start" in tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]


def test_model_object_tokenizer_kwarg_and_plain_training_arguments(tmp_path, tokenizer):
    from transformers import TrainingArguments

    model = make_model(tokenizer)
    targs = TrainingArguments(
        output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=2, report_to="none"
    )
    trainer = SFTTrainer(
        model=model,
        args=targs,
        tokenizer=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(4)),
    )
    assert isinstance(trainer.args, SFTConfig) and trainer.args.max_steps == 1
    trainer.train()


class PlainLM(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def test_plain_torch_module(tmp_path, tokenizer):
    model = PlainLM(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SFTTrainer(
        model=model,
        args=args(tmp_path),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(8)),
    )
    trainer.train()
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p.detach()), name


def test_plain_module_needs_a_tokenizer(tmp_path, tokenizer):
    with pytest.raises(ChatSFTError, match="processing_class"):
        SFTTrainer(
            model=PlainLM(10),
            args=args(tmp_path),
            train_dataset=datasets.Dataset.from_list(chats(2)),
        )


def test_formatting_func_and_eval_dict(tmp_path, model_dir):
    rows = datasets.Dataset.from_list([{"q": "what is two", "a": "four"}] * 8)

    def fmt(ex):
        return [{"role": "user", "content": ex["q"]}, {"role": "assistant", "content": ex["a"]}]

    trainer = SFTTrainer(
        model=model_dir,
        args=args(tmp_path, eval_strategy="steps", eval_steps=2, assistant_only_loss=True),
        train_dataset=rows,
        eval_dataset={"a": rows.select(range(4)), "b": rows.select(range(2))},
        formatting_func=fmt,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_mean_token_accuracy"} <= set(metrics)


def test_bad_rows_name_row_and_field(tmp_path, model_dir):
    bad = [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]},
            "row 2, field 'messages\\[1\\].role'",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            "row 2, field 'messages\\[1\\].content'",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "row 2, field 'messages': conversation has no assistant",
        ),
    ]
    good = chats(1)[0]
    for row, match in bad:
        with pytest.raises(ChatSFTError, match=match):
            SFTTrainer(
                model=model_dir,
                args=args(tmp_path),
                train_dataset=datasets.Dataset.from_list([good, row]),
            )


def test_unknown_columns_list_what_was_found(tmp_path, model_dir):
    with pytest.raises(ChatSFTError, match=r"\['foo'\].*'messages'"):
        SFTTrainer(
            model=model_dir,
            args=args(tmp_path),
            train_dataset=datasets.Dataset.from_list([{"foo": "x"}]),
        )


class NaNAtCall(PlainLM):
    """Returns NaN logits on its n-th training call."""

    def __init__(self, vocab: int, bad_call: int):
        super().__init__(vocab)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, input_ids):
        self.calls += 1
        logits = super().forward(input_ids)
        return logits * float("nan") if self.calls == self.bad_call else logits


def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path, tokenizer):
    data = datasets.Dataset.from_list(chats(16))
    trainer = SFTTrainer(
        model=NaNAtCall(len(tokenizer), 2),
        args=args(tmp_path),
        processing_class=tokenizer,
        train_dataset=data,
    )
    with pytest.raises(ChatSFTError, match="the loss is nan at step 2"):
        trainer.train()


class Snapshots(TrainerCallback):
    """The trainable parameters after every optimizer step."""

    def __init__(self, model):
        self.model, self.after = model, {0: self.copy(model)}

    @staticmethod
    def copy(model):
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = self.copy(self.model)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch", "sgd"])
def test_a_skipped_step_leaves_the_weights_untouched(tmp_path, tokenizer, capsys, optim):
    """The update of a non-finite step is not applied at all: with AdamW a zero gradient would
    still move the weights (momentum), so the step itself is skipped (fused AdamW: on the device,
    through the optimizer's found_inf flag; others: on the host)."""
    model = NaNAtCall(len(tokenizer), 2)
    snapshots = Snapshots(model)
    trainer = SFTTrainer(
        model=model,
        args=args(tmp_path, max_nonfinite_batches=1, optim=optim, max_steps=4, logging_steps=2),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(16)),
        callbacks=[snapshots],
    )
    trainer.train()
    assert trainer.nonfinite_steps == [2]
    after = snapshots.after
    assert all(torch.equal(a, b) for a, b in zip(after[1], after[2]))
    for step in (1, 3, 4):
        assert all(not torch.equal(a, b) for a, b in zip(after[step - 1], after[step]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = capsys.readouterr().out
    assert "skipped step 2: its loss is nan" in out
    assert "skipped 1 non-finite steps (2)" in out
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(x) and x > 0 for x in logged)


class CountSyncsOfSteps(TrainerCallback):
    """Host-device syncs during optimizer steps first < step <= last."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.mode = first, last, CountSyncs()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            self.mode.__enter__()
        if state.global_step == self.last:
            self.mode.__exit__(None, None, None)


def test_a_training_step_syncs_only_where_the_forward_reads_its_batch(tmp_path, tokenizer):
    """Between logging steps the host never waits for the device outside the model's forward:
    non-finite checks, the gradient norm and the logged loss stay on the device."""
    counter = CountSyncsOfSteps(2, 5)
    trainer = SFTTrainer(
        model=make_model(tokenizer),
        args=args(tmp_path, max_steps=6, logging_steps=100, padding_free=True),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(32)),
        callbacks=[counter],
    )
    trainer.train()
    # per step: trained positions, document starts, the longest document (chatsft's loss, before
    # the forward) and transformers' packed-row check: the same 4 as a bare forward+backward.
    assert counter.mode.count == 3 * 4


class NaNGradient(PlainLM):
    """Finite loss, NaN gradient: d sqrt(z)/dz at z = 0 is inf, times 0 is NaN."""

    def __init__(self, vocab: int):
        super().__init__(vocab)
        self.z = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return super().forward(input_ids) + 0.0 * torch.sqrt(self.z)


def test_nonfinite_gradient_stops_the_run_naming_the_step(tmp_path, tokenizer):
    trainer = SFTTrainer(
        model=NaNGradient(len(tokenizer)),
        args=args(tmp_path),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(8)),
    )
    with pytest.raises(ChatSFTError, match="the gradient norm is nan at step 1"):
        trainer.train()


def test_bf16_autocast_training_runs_with_the_chunked_loss(tmp_path, model_dir):
    trainer = SFTTrainer(
        model=model_dir,
        args=args(tmp_path, bf16=True, use_cpu=True, padding_free=True),
        train_dataset=datasets.Dataset.from_list(chats(8)),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(0 < x < 20 for x in losses)


def test_torch_compile_gives_the_same_losses(tmp_path, tokenizer):
    """torch_compile is opt-in; on CPU it must train exactly like eager (about 40 s of compiling)."""
    losses = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainer = SFTTrainer(
            model=make_model(tokenizer, seed=3),
            args=args(tmp_path, max_steps=3, torch_compile=compiled, lr_scheduler_type="constant"),
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(chats(12)),
        )
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        layers = trainer.model.model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
    # Padding-free rows: the attention is inside each layer's graph, not a break in it.
    assert not torch._dynamo.utils.counters["graph_break"]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_nonfinite_flags_are_read_early_when_the_run_rarely_logs(monkeypatch):
    from chatsft.train import nonfinite

    monkeypatch.setattr(nonfinite, "MAX_PENDING", 2)
    guard = nonfinite.NonFiniteGuard()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for step, value in enumerate([float("nan"), 1.0, 2.0], start=1):
        guard.poison(torch.tensor(value))
        guard.before_step(step, torch.tensor(value), optimizer)
    assert len(guard._pending) == 1  # the first two were read already
    found = guard.read()
    assert [(s.step, s.what) for s in found] == [(1, "loss")] and math.isnan(found[0].value)
    assert guard.read() == [] and guard._pending == []
