"""Mixture-of-Experts models: the router's load-balancing loss that training adds, as TRL does."""

from __future__ import annotations

import torch

from ..errors import ChatSFTError
from .loss import unwrap_model


def router_aux_coef(model: torch.nn.Module, coef: float | None) -> float:
    """The weight of the router's load-balancing loss in the training loss: `coef`, or (None) the
    model config's own `router_aux_loss_coef`; 0.0 for a model without one. Sets the config so
    that the forward returns `aux_loss` exactly when the weight is not zero."""
    config = getattr(unwrap_model(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    is_moe = config is not None and hasattr(config, "output_router_logits")
    if coef and not is_moe:
        raise ChatSFTError(
            f"router_aux_loss_coef is {coef}, but {type(unwrap_model(model)).__name__} is not a "
            "Mixture-of-Experts model with a router loss",
            field="router_aux_loss_coef",
            hint="leave router_aux_loss_coef unset for dense models",
        )
    if not is_moe:
        return 0.0
    value = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else coef
    config.output_router_logits = value != 0.0
    if hasattr(config, "router_aux_loss_coef"):
        config.router_aux_loss_coef = value
    return float(value)


def router_loss(aux_loss: torch.Tensor, coef: float, micro_batches: int) -> torch.Tensor:
    """The router term of a micro-batch's loss. `aux_loss` is a per-micro-batch mean (DDP averages
    it over ranks): divided by the step's micro-batches, so that gradient accumulation leaves its
    weight unchanged (as TRL does)."""
    return coef * aux_loss / micro_batches
