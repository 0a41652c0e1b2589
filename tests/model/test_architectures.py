"""The architectures TRL's own SFT tests train, built tiny from configs: every parameter trains, a
packed row gives the padded loss exactly, and where a model cannot keep packed documents apart
(recurrent/conv layers, masks that ignore position_ids) packing is refused with the reason."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from conftest import chats

from chatsft import ChatSFTError, SFTConfig, SFTTrainer

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
    bos_token_id=None,
)
ARCHITECTURES = {
    "cohere2": {},  # sliding windows: the dense-mask path, checked by running it
    "glm4_moe": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        moe_intermediate_size=16,
        n_group=1,
        topk_group=1,
    ),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
    "lfm2": dict(layer_types=["conv", "full_attention"], initializer_range=0.5),
    "nemotron_h": dict(
        hybrid_override_pattern="M*",
        mamba_num_heads=4,
        mamba_head_dim=8,
        ssm_state_size=8,
        n_groups=1,
    ),
    "olmo3": {},
    "qwen2": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
}
# Why packing is refused for these (the message names it).
NO_PACKING = {
    "gpt_oss": "attention mask does not follow the position_ids",
    "lfm2": "Lfm2ShortConv layers carry state",
    "nemotron_h": "layers carry state",
}
HAS_ROUTER_LOSS = {"gpt_oss", "qwen3_moe"}


def build(name, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        name,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**COMMON, **ARCHITECTURES[name]},
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def config(tmp_path, **kw):
    return SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,  # one eval batch: its loss is the set's token mean
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=1024,
        training_report=False,
        **kw,
    )


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_trains_and_packs_exactly_or_refuses(tmp_path, tokenizer, name):
    rows = datasets.Dataset.from_list(chats(8))
    model = build(name, tokenizer)
    packing_model = copy.deepcopy(model)
    trainer = SFTTrainer(
        model=model,
        args=config(tmp_path, padding_free=False),
        processing_class=tokenizer,
        train_dataset=rows,
        eval_dataset=rows,
    )
    padded_loss = trainer.evaluate()["eval_loss"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
    assert not unchanged, f"{name}: parameters not trained: {unchanged[:5]}"
    assert trainer.aux_loss_enabled == (name in HAS_ROUTER_LOSS)
    if trainer.aux_loss_enabled:
        assert trainer.state.log_history[-1]["aux_loss"] > 0

    packed = dict(
        model=packing_model,
        args=config(tmp_path, packing=True),
        processing_class=tokenizer,
        train_dataset=rows,
        eval_dataset=rows,
    )
    if name in NO_PACKING:
        with pytest.raises(ChatSFTError, match=NO_PACKING[name]):
            SFTTrainer(**packed)
        # By default such a model gets padded rows, never a shared one.
        auto = SFTTrainer(
            model=packing_model,
            args=config(tmp_path),
            processing_class=tokenizer,
            train_dataset=rows,
        )
        assert "position_ids" not in next(iter(auto.get_train_dataloader()))
    else:
        packed_loss = SFTTrainer(**packed).evaluate()["eval_loss"]
        assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
