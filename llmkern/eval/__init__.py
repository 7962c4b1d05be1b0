"""Evaluation: log-probabilities, perplexity, multiple-choice scoring and win rates."""

from .logprobs import sequence_logprobs, token_logprobs

__all__ = ["sequence_logprobs", "token_logprobs"]
