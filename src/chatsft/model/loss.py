"""Supervised-only cross-entropy.

The objective is ordinary teacher-forced next-token cross-entropy over the trained tokens. Only the
positions whose next token is trained reach the LM head (`logits_to_keep`: their indices for a
padding-free row, a boolean mask for padded rows), so logits for prompts, padding and system text
are never computed. With `chunked=True` (a plain linear LM head, no logit soft-capping or scaling)
even those logits are never materialised at once: for that forward the head itself computes the loss
in chunks (`chunked_ce`). The *sum* is returned; dividing by the step's global trained-token count
happens in the trainer.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.collate import IGNORE_INDEX
from .attention import ATTN_NAME, boundaries, boundary_kwargs, is_prompt_learning
from .chunked_ce import chunked_linear_cross_entropy

# Config fields with which a model transforms logits after its LM head; the chunked path would skip
# that transformation, so such models use the plain path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
CHUNK_ELEMENTS = 128 * 2**20  # fp32 logits per chunk: 512 MB


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # scalar, differentiable
    num_tokens: torch.Tensor  # scalar int, trained tokens in this micro-batch
    num_correct: torch.Tensor  # scalar int, greedy predictions equal to the target


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/accelerate wrappers and a peft wrapper."""
    while True:
        inner = getattr(model, "module", None)  # DDP / accelerate wrappers
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        if hasattr(model, "get_base_model"):  # peft
            return model.get_base_model()
        return model


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters


def _passes_kwargs_down(model: torch.nn.Module) -> bool:
    params = inspect.signature(unwrap_model(model).forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] → [batch, seq]: target of position t is labels[t + 1]; the last has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs.logits


def chunkable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head if the chunked path can replace it exactly, else None."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    # A wrapped head (LoRA on lm_head, accelerate hooks that replace forward) keeps the plain path.
    if type(head) is not torch.nn.Linear or "forward" in head.__dict__:
        return None
    return head


@contextmanager
def _head_computes_loss(head: torch.nn.Linear, target: torch.Tensor, dft: bool) -> Iterator[None]:
    """For one forward, the LM head returns [loss_sum, num_correct] instead of logits.

    The loss is computed inside the head's own forward so that DDP and FSDP see the head's weight
    used where they expect it (DDP refuses a parameter used outside forward)."""
    chunk = max(64, CHUNK_ELEMENTS // head.out_features)

    def loss_forward(hidden: torch.Tensor) -> torch.Tensor:
        loss_sum, correct = chunked_linear_cross_entropy(
            hidden.reshape(-1, head.in_features), head.weight, head.bias, target, chunk, dft=dft
        )
        return torch.stack([loss_sum, correct.to(loss_sum.dtype)])

    head.forward = loss_forward
    try:
        yield
    finally:
        del head.forward


def with_document_boundaries(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """For a padding-free row under chatsft's document attention: the inputs plus the row's
    document boundaries, read once here, before the forward, rather than inside it."""
    position_ids = inputs.get("position_ids")
    config = getattr(unwrap_model(model), "config", None)
    if (
        getattr(config, "_attn_implementation", None) != ATTN_NAME
        or position_ids is None
        or position_ids.shape[0] != 1
        or inputs.get("attention_mask") is not None
        or "cu_seq_lens_q" in inputs
        or not _passes_kwargs_down(model)
    ):
        return inputs
    return {**inputs, **boundary_kwargs(boundaries(position_ids))}


def _trained_positions(
    keep: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`logits_to_keep` for the model, the targets at those positions), in the model's order.

    A single (padding-free) row gets integer positions: finding them is the step's one host sync
    for the loss, before the forward; a boolean mask would cost a second one inside it, at the LM
    head."""
    if keep.shape[0] == 1:
        positions = keep[0].nonzero().squeeze(1)
        return positions, targets[0, positions]
    return keep, targets[keep]


def supervised_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    chunked: bool = False,
    dft: bool = False,
    all_logits: bool = False,
) -> tuple[LossParts, Any]:
    """Forward the model and return the summed loss over trained tokens, plus the raw outputs
    (whose `logits` are real logits only with chunked=False). `dft`: each token's cross-entropy
    weighted by the model's detached probability of it (Dynamic Fine-Tuning). `all_logits`: the
    outputs keep logits for every position, aligned with the labels (for compute_metrics)."""
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    if is_prompt_learning(model):
        # Logits for every position; prompt tuning puts its virtual tokens' logits first, so the
        # last labels.shape[1] positions are the ones aligned with the labels.
        outputs = model(**inputs)
        logits = _logits(outputs)[:, -labels.shape[1] :]
        return _loss_from_logits(logits[keep], targets[keep], keep, dft), outputs
    to_keep, target = _trained_positions(keep, targets)
    inputs = with_document_boundaries(model, inputs)
    chunked = chunked and not all_logits
    head = chunkable_head(model) if chunked and accepts_logits_to_keep(model) else None
    if head is not None:
        with _head_computes_loss(head, target, dft):
            outputs = model(**inputs, logits_to_keep=to_keep, use_cache=False)
        loss_sum, correct = _logits(outputs)
        return LossParts(loss_sum, keep.sum(), correct.detach().long()), outputs
    if accepts_logits_to_keep(model) and not all_logits:
        outputs = model(**inputs, logits_to_keep=to_keep, use_cache=False)
        logits = _logits(outputs).reshape(-1, _logits(outputs).shape[-1])
    elif accepts_logits_to_keep(model):
        outputs = model(**inputs, use_cache=False)
        logits = _logits(outputs)[keep]
    else:
        outputs = model(**inputs)
        logits = _logits(outputs)[keep]
    return _loss_from_logits(logits, target, keep, dft), outputs


def _loss_from_logits(
    logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, dft: bool
) -> LossParts:
    """[n, vocab] logits of the trained positions and their [n] targets → summed loss parts."""
    token_loss = F.cross_entropy(logits.float(), target, reduction="none")
    if dft:
        token_loss = token_loss * torch.exp(-token_loss.detach())
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == target).sum()
    return LossParts(token_loss.sum(), keep.sum(), correct)
