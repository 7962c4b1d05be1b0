"""A GPT body with a linear head on each row's last real token: a classifier (one logit per class) and a
reward model (one score) are both this.

The head reads the last real token because, with causal attention, it is the only position that has
seen the whole text; rows are right-padded, so the padding after it never changes it. Saved as one flat
state: the body's weights under the GPT's own names (so finetune.base.load_base can start a plain GPT
from it) and the head's under "head.*".
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import GPT
from .aux_loss import real_tokens

HEAD_PREFIX = "head."


class LastTokenHead(nn.Module):
    """body: a llmkern GPT; head: nn.Linear(n_embd, out_features), weights N(0, init_std), bias 0."""

    def __init__(self, body: GPT, out_features: int, init_std: float):
        super().__init__()
        if not isinstance(body, GPT):
            raise TypeError(f"body must be a llmkern.model.GPT, got {type(body).__name__}")
        self.body = body
        # Drawn on the CPU, then moved: one seed gives the same head on a GPU, on the CPU and under FSDP (whose
        # rank 0 holds the body on its CPU)
        head = nn.Linear(body.config.n_embd, out_features)
        nn.init.normal_(head.weight, std=init_std)
        nn.init.zeros_(head.bias)
        self.head = head.to(body.device)

    def head_outputs(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) right-padded token ids, lengths (B,) real tokens per row (None: all T) -> (B, out).

        Row i's real tokens must be ids[i, :lengths[i]]. There is no attention mask or padding side: the body
        runs causally from column 0 with positions 0.., so left-padded rows (as generation pads) would read a
        pad token here, and even pooled right their real tokens would attend to the padding and sit at shifted
        positions; the padding cannot be told from real tokens (no pad id), so such input is not detected.
        Every llmkern caller right-pads (finetune.data.pad_batch: classify's collate_rows and classify_texts,
        the reward model's make_score_batch)."""
        return self.head_outputs_with_aux_loss(ids, lengths)[0]

    def head_outputs_with_aux_loss(self, ids: torch.Tensor, lengths: torch.Tensor | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(head_outputs, the body's load-balancing loss over the rows' real tokens, or None for a dense body or
        in eval mode): the training forward pass. Its loss belongs in the head's training loss as in a language
        model's, though transformers' *ForSequenceClassification leave it out: see finetune.aux_loss."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a (B, T) tensor of token ids, got {got}")
        b, t = ids.shape
        if t > self.body.config.block_size:
            raise ValueError(f"ids has {t} tokens per row; the model takes at most {self.body.config.block_size}")
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=ids.device)
        check_lengths(lengths, b, t)
        lengths = lengths.to(ids.device).long()
        hidden, aux = self.body.hidden_states_with_aux_loss(ids, real_tokens(lengths, t))  # (B, T, C)
        rows = torch.arange(b, device=ids.device)
        last = hidden[rows, lengths - 1]  # (B, C): each row's last real token
        return self.head(last.to(self.head.weight.dtype)), aux

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        """The body's weights under the GPT's names and the head's under "head.*" (one flat state)."""
        state = dict(self.body.state_dict())
        state.update({HEAD_PREFIX + k: v for k, v in self.head.state_dict().items()})
        return state

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of state_for_saving (strict: every weight must be there, nothing else)."""
        self.body.load_state_dict({k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)})
        self.head.load_state_dict({k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)})

    @property
    def device(self) -> torch.device:
        return self.body.device


def check_lengths(lengths: object, b: int, t: int) -> None:
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {getattr(lengths, 'dtype', type(lengths).__name__)}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape ({b},), one per row of ids; got {tuple(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > t).any()):
        raise ValueError(f"lengths must be in [1, {t}] (ids has {t} columns); got {lengths.tolist()}")
