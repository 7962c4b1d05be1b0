"""The load-balancing loss of a mixture-of-experts model in the fine-tuning recipes.

A MoE model (GPTConfig.n_experts) pretrains on its loss plus router_aux_loss_coef times the load-balancing loss
of its routers (GPT.forward). Fine-tuning it on any other loss alone would let the routing drift out of balance
unchecked, so every recipe that trains one does the same: its forward pass runs in training mode through
GPT.hidden_states_with_aux_loss (or forward, for SFT) over the batch's real tokens, and adds
router_aux_loss_coef times that load-balancing loss to the recipe's loss. That holds for the heads too (the
classifier and the reward model), where transformers' *ForSequenceClassification add no aux loss: their routers
train on the head's loss just the same, and the coefficient is the model's own setting, one switch for every
recipe (0 turns it off; a Hugging Face import sets it only where config.json has output_router_logits true, as
transformers' causal LM reads it). A frozen model (DPO's, PPO's and GRPO's
reference, PPO's and GRPO's reward model) runs in eval mode and adds nothing.

The recipes log the load-balancing loss as "aux_loss" beside their "loss", which is the recipe's own loss, not the
objective trained on (that adds router_aux_loss_coef * aux_loss): comparable with the validation loss, which eval
mode leaves without it, and with a dense model's, as the pretraining trainer logs the cross-entropy alone. The
metrics carry it as "loss", which finetune.loop logs in place of the objective. finetune.loop draws aux_loss.png
from aux_loss. (PPO's and GRPO's "loss" is the whole objective, with the aux term: they have no validation loss to
match.)
"""

from __future__ import annotations

import torch

from ..model import GPTConfig


def with_aux_loss(loss: torch.Tensor, aux: torch.Tensor | None, config: GPTConfig
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss plus config.router_aux_loss_coef * aux, {"loss": loss detached, "aux_loss": aux detached}) for a
    forward pass with a load-balancing loss `aux` (the metrics' "loss": the recipe's own, which finetune.loop logs);
    (loss, {}) for one without (aux None: a dense model, or eval mode)."""
    if aux is None:
        return loss, {}
    metrics = {"loss": loss.detach(), "aux_loss": aux.detach()}
    if config.router_aux_loss_coef > 0:
        loss = loss + config.router_aux_loss_coef * aux
    return loss, metrics


def real_tokens(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """(B, T) bool token mask of right-padded rows with lengths (B,) real tokens: True at each row's first
    lengths[b] columns."""
    return torch.arange(t, device=lengths.device) < lengths.unsqueeze(-1)
