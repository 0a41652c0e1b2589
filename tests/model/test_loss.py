"""Loss correctness: reference cross-entropy, packing isolation, gradient-accumulation equivalence."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import chats, make_model

from chatsft import SFTConfig, SFTTrainer
from chatsft.data.collate import PaddedCollator, PaddingFreeCollator
from chatsft.data.encode import PrepOptions
from chatsft.data.packing import best_fit_decreasing, pack_dataset
from chatsft.data.prepare import prepare_for_training
from chatsft.model.attention import use_document_attention
from chatsft.model.loss import supervised_loss


def prepared(tokenizer, n=8):
    opts = PrepOptions(eos_token=tokenizer.eos_token, assistant_only_loss=True, max_length=128)
    ds, _ = prepare_for_training(datasets.Dataset.from_list(chats(n)), tokenizer, opts)
    return ds


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_loss_matches_full_logit_cross_entropy(tokenizer, chunked, tied):
    model = make_model(tokenizer)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    ds = prepared(tokenizer)
    batch = PaddedCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    labels = batch.pop("labels")
    parts, _ = supervised_loss(model, batch, labels, chunked=chunked)
    logits = model(**batch).logits
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(parts.loss_sum, ref, rtol=1e-5, atol=1e-5)
    params = [model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight]
    for g, g_ref in zip(
        torch.autograd.grad(parts.loss_sum, params), torch.autograd.grad(ref, params)
    ):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert parts.num_correct == (logits[:, :-1].argmax(-1) == labels[:, 1:]).sum()
    assert parts.num_tokens == (labels[:, 1:] != -100).sum()


@pytest.mark.parametrize(
    ("attention", "filler"), [("sdpa", None), ("document", None), ("document", 64), ("sdpa", 64)]
)
def test_packed_equals_unpacked(tokenizer, attention, filler):
    """Same documents, padded rows vs one padding-free packed row: same summed loss and gradient,
    with transformers' dense-mask SDPA and with chatsft's per-document attention, also when the
    row ends with a filler document (pad_to_multiple_of)."""
    model = make_model(tokenizer)
    if attention == "document":
        assert "document-isolated" in use_document_attention(model)
    ds = prepared(tokenizer)
    padded = PaddedCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    packed_ds = pack_dataset(ds, max_length=256)
    assert len(packed_ds) < len(ds)
    collator = PaddingFreeCollator(tokenizer.pad_token_id, pad_to_multiple_of=filler)
    flat = collator([packed_ds[i] for i in range(len(packed_ds))])
    if filler:
        assert collator.filler_tokens > 0 and flat["input_ids"].shape[1] % filler == 0
    a, _ = supervised_loss(
        model, {k: v for k, v in padded.items() if k != "labels"}, padded["labels"]
    )
    b, _ = supervised_loss(model, {k: v for k, v in flat.items() if k != "labels"}, flat["labels"])
    assert a.num_tokens == b.num_tokens
    torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-5, atol=1e-4)
    w = model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(
        torch.autograd.grad(a.loss_sum, w)[0],
        torch.autograd.grad(b.loss_sum, w)[0],
        rtol=1e-4,
        atol=1e-5,
    )


def test_filler_document_layout():
    """The filler is one extra document of pad tokens: positions restart, nothing is trained."""
    docs = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
    ]
    collator = PaddingFreeCollator(pad_token_id=0, pad_to_multiple_of=8)
    batch = collator(docs)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert collator.filler_tokens == 3
    without = PaddingFreeCollator(pad_token_id=0)
    assert without(docs)["input_ids"].shape == (1, 5) and without.filler_tokens == 0


def test_best_fit_decreasing_keeps_every_document_once():
    lengths = [5, 9, 3, 7, 10, 1, 4, 4, 8, 2]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 6  # 53 tokens, capacity 10: optimal


def _train_once(tokenizer, tmp_path, batch, accum, packing=False):
    model = make_model(tokenizer, seed=1)
    cfg = SFTConfig(
        output_dir=str(tmp_path / f"o{batch}{accum}{packing}"),
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="sgd",  # Adam's first step is sign(g): float noise near g=0 would flip it
        save_strategy="no",
        disable_tqdm=True,
        assistant_only_loss=True,
        max_length=128,
        padding_free=packing,
        seed=3,
    )
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=datasets.Dataset.from_list(chats(8, seed=5)),
        processing_class=tokenizer,
    )
    # Fixed order, so every run sees the same 8 examples in the step.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(
        trainer.train_dataset
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_4x2_equals_1x8(tokenizer, tmp_path):
    one = _train_once(tokenizer, tmp_path, batch=8, accum=1)
    four = _train_once(tokenizer, tmp_path, batch=2, accum=4)
    free = _train_once(tokenizer, tmp_path, batch=2, accum=4, packing=True)
    for name in one:
        torch.testing.assert_close(one[name], four[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(one[name], free[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_chunked_cross_entropy_matches_reference_across_chunks(fused):
    from chatsft.model.chunked_ce import chunked_linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    b = torch.randn(100, requires_grad=True)
    t = torch.randint(0, 100, (50,))
    loss, correct = chunked_linear_cross_entropy(h, w, b, t, chunk_size=7, fused=fused)
    grads = torch.autograd.grad(3 * loss, (h, w, b), retain_graph=True)
    logits = h @ w.T + b
    ref = F.cross_entropy(logits, t, reduction="sum")
    torch.testing.assert_close(loss, ref)
    for g, g_ref in zip(grads, torch.autograd.grad(3 * ref, (h, w, b))):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert correct == (logits.argmax(-1) == t).sum()
    # Gradients are scaled in place: a second backward must fail loudly, not return wrong values.
    with pytest.raises(RuntimeError, match="one backward"):
        torch.autograd.grad(loss, (h, w, b))


def test_padding_free_collator_names_a_mismatched_field():
    from chatsft.errors import ChatSFTError

    good = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    with pytest.raises(ChatSFTError, match="example 1 of the batch has 3 input_ids but labels"):
        PaddingFreeCollator()([good, {**good, "labels": [6, 7]}])
    with pytest.raises(ChatSFTError, match="seq_lengths covers 4"):
        PaddingFreeCollator()([{**good, "seq_lengths": [1, 3]}])
