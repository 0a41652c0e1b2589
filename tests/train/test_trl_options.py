"""TRL 1.16 SFTConfig/SFTTrainer options beyond the basics: the same names, the same meaning."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import chats, make_model
from conftest import sft_config as config

from chatsft import SFTConfig, SFTTrainer
from chatsft.model.chunked_ce import chunked_linear_cross_entropy
from chatsft.train.build import model_init_kwargs


@pytest.mark.parametrize("fused", [False, True])
def test_dft_loss_matches_a_full_logit_reference(fused):
    """DFT: each token's cross-entropy times its (detached) probability, gradients included."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    target = torch.randint(0, 50, (37,))
    loss, _ = chunked_linear_cross_entropy(hidden, weight, None, target, 8, fused=fused, dft=True)
    got = torch.autograd.grad(loss, [hidden, weight])
    ce = F.cross_entropy(hidden @ weight.T, target, reduction="none")
    ref = (ce * torch.exp(-ce).detach()).sum()
    want = torch.autograd.grad(ref, [hidden, weight])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dft_trains_with_a_different_loss_than_nll(tmp_path, tokenizer):
    def first_loss(loss_type):
        trainer = SFTTrainer(
            model=make_model(tokenizer),
            args=config(tmp_path, loss_type=loss_type, max_steps=1),
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(chats(8)),
        )
        trainer.train()
        return trainer.state.log_history[0]["loss"]

    nll, dft = first_loss("nll"), first_loss("dft")
    # A random model gives each token probability ~1/vocab: DFT's loss is ~nll/vocab.
    assert 0 < dft < nll / 50


def _mixtral(tokenizer, coef=0.5):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        router_aux_loss_coef=coef,
    )
    return MixtralForCausalLM(cfg)


@pytest.mark.parametrize("padding_free", [False, True])
def test_moe_router_loss_is_added_as_transformers_adds_it(tmp_path, tokenizer, padding_free):
    """By default the model config's router_aux_loss_coef: the training loss equals the model's
    own loss with labels (cross-entropy + coef * load-balancing loss)."""
    model = _mixtral(tokenizer)
    trainer = SFTTrainer(
        model=model,
        args=config(tmp_path, padding_free=padding_free),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(8)),
    )
    assert model.config.output_router_logits
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        keys = ("input_ids", "attention_mask", "position_ids")
        theirs = model(**{k: v for k, v in batch.items() if k in keys}, labels=batch["labels"])
    torch.testing.assert_close(ours, theirs.loss, rtol=1e-6, atol=1e-6)
    assert theirs.aux_loss > 0
    model.train()
    trainer.train()
    assert all(h["aux_loss"] > 0 for h in trainer.state.log_history if "loss" in h)


def test_router_loss_coefficient_zero_turns_it_off_and_dense_models_refuse_one(tmp_path, tokenizer):
    model = _mixtral(tokenizer)
    trainer = SFTTrainer(
        model=model,
        args=config(tmp_path, router_aux_loss_coef=0.0),
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chats(8)),
    )
    assert not model.config.output_router_logits and trainer.router_aux_loss_coef == 0.0
    with pytest.raises(Exception, match="not a Mixture-of-Experts model"):
        SFTTrainer(
            model=make_model(tokenizer),
            args=config(tmp_path, router_aux_loss_coef=0.01),
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(chats(8)),
        )


def test_packing_strategy_names():
    assert SFTConfig(output_dir="o", packing=True, max_length=8).packing_strategy == "bfd"
    split = SFTConfig(output_dir="o", packing=True, max_length=8, packing_strategy="bfd_split")
    assert split.overlong_policy == "split"
    wrapped = SFTConfig(output_dir="o", packing=True, max_length=8, packing_strategy="wrapped")
    assert wrapped.overlong_policy == "split"
    with pytest.raises(ValueError, match="packing_strategy must be one of"):
        SFTConfig(output_dir="o", packing_strategy="ffd")
    with pytest.raises(ValueError, match="bfd_split cuts long examples"):
        SFTConfig(output_dir="o", packing_strategy="bfd_split", overlong_policy="drop")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        SFTConfig(output_dir="o", loss_type="focal")
    with pytest.raises(ValueError, match="activation_offloading is not offered"):
        SFTConfig(output_dir="o", activation_offloading=True)


def test_eval_packing_and_shuffle_dataset(tmp_path, tokenizer):
    rows = datasets.Dataset.from_list(chats(24))
    trainer = SFTTrainer(
        model=make_model(tokenizer),
        args=config(tmp_path, eval_packing=True, shuffle_dataset=True, seed=3, max_length=256),
        processing_class=tokenizer,
        train_dataset=rows,
        eval_dataset=rows,
    )
    packed_eval = [len(r["seq_lengths"]) for r in trainer.eval_dataset]
    assert len(trainer.eval_dataset) < len(rows) and max(packed_eval) > 1
    assert len(trainer.train_dataset) == len(rows)  # train is not packed
    plain = SFTTrainer(
        model=make_model(tokenizer),
        args=config(tmp_path, max_length=256),
        processing_class=tokenizer,
        train_dataset=rows,
    )
    ids = [r["input_ids"] for r in trainer.train_dataset]
    unshuffled = [r["input_ids"] for r in plain.train_dataset]
    assert ids != unshuffled and sorted(ids) == sorted(unshuffled)
    want = [unshuffled[i] for i in datasets.Dataset.from_dict({"i": range(24)}).shuffle(3)["i"]]
    assert ids == want
    trainer.train()  # the packed eval set goes through the padding-free collator
    assert trainer.evaluate()["eval_loss"] > 0


def test_quantization_config_and_trust_remote_code_reach_from_pretrained():
    args = SFTConfig(output_dir="o", trust_remote_code=True, model_init_kwargs={"dtype": "float32"})
    kwargs = model_init_kwargs(args, "org/model", {"load_in_4bit": True})
    assert kwargs == {
        "dtype": "float32",
        "quantization_config": {"load_in_4bit": True},
        "trust_remote_code": True,
    }
    # By name, weights load in float32 unless a dtype is given (TRL's default).
    assert model_init_kwargs(SFTConfig(output_dir="o"), "org/model", None) == {"dtype": "float32"}
    with pytest.raises(Exception, match="only applies when model is a hub id"):
        model_init_kwargs(args, torch.nn.Linear(2, 2), {"load_in_4bit": True})


def test_compute_metrics_gets_logits_aligned_with_the_labels(tmp_path, tokenizer):
    """TRL's token-accuracy recipe (argmax in preprocess_logits_for_metrics, shift by one in
    compute_metrics) gives the accuracy chatsft logs itself; training keeps the chunked loss."""
    seen = {}

    def metrics(ev):
        preds, labels = ev.predictions[:, :-1], ev.label_ids[:, 1:]
        mask = labels != -100
        seen["shapes"] = (ev.predictions.shape, ev.label_ids.shape)
        return {"acc": float((preds[mask] == labels[mask]).mean())}

    rows = datasets.Dataset.from_list(chats(12))
    trainer = SFTTrainer(
        model=make_model(tokenizer),
        args=config(tmp_path, max_steps=8, learning_rate=1e-2, per_device_eval_batch_size=4),
        processing_class=tokenizer,
        train_dataset=rows,
        eval_dataset=rows,
        compute_metrics=metrics,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
    )
    assert trainer._chunked_loss
    trainer.train()
    result = trainer.evaluate()
    assert seen["shapes"][0] == seen["shapes"][1]
    assert result["eval_acc"] > 0
    assert result["eval_acc"] == pytest.approx(result["eval_mean_token_accuracy"], abs=1e-6)


def test_wrapped_packing_cuts_the_stream_at_row_ends_and_keeps_every_token():
    from chatsft.data.packing import pack_rows

    ids = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    labels = [[1, 2, 3], [-100, 5, 6, 7, 8], [9]]
    rows = pack_rows(ids, labels, 4, "wrapped")
    assert rows["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert rows["seq_lengths"] == [[3, 1], [4], [1]]
    assert rows["labels"] == [[1, 2, 3, -100], [5, 6, 7, 8], [9]]


def test_wrapped_packing_trains_and_streams_alike(tmp_path, tokenizer):
    """Map-style and streaming preparation give the same wrapped rows; training runs on them."""
    from chatsft.data.streaming import ConstantLengthDataset

    rows = datasets.Dataset.from_list(chats(12))
    trainer = SFTTrainer(
        model=make_model(tokenizer),
        args=config(tmp_path, packing=True, packing_strategy="wrapped", max_length=48),
        processing_class=tokenizer,
        train_dataset=rows,
    )
    packed = trainer.train_dataset
    assert all(len(r) == 48 for r in packed["input_ids"][:-1])
    assert sum(map(len, packed["input_ids"])) == trainer.prep_stats["train"].total_tokens
    streamed = list(
        ConstantLengthDataset(
            rows.to_iterable_dataset(),
            tokenizer,
            trainer._eval_prep[1],
            packing=True,
            packing_strategy="wrapped",
        )
    )
    assert [r["input_ids"] for r in streamed] == packed["input_ids"]
    assert [r["seq_lengths"] for r in streamed] == packed["seq_lengths"]
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0
