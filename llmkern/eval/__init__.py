"""Evaluation: log-probabilities, perplexity, multiple-choice scoring, LAMBADA, GSM8K and win rates."""

from .gsm8k import evaluate_gsm8k, load_gsm8k
from .lambada import evaluate_lambada, load_lambada
from .logprobs import logprobs_from_hidden, sequence_logprobs, token_logprobs
from .multiple_choice import ChoiceExample, evaluate_choices, load_choice_tasks, score_choices
from .perplexity import perplexity, perplexity_of_text, sliding_windows
from .win_rate import (
    Judge, LMJudge, PairJudge, RewardModelJudge, bootstrap_interval, compare_runs, generate_responses, lm_judge,
    reward_model_judge, wilson_interval, win_rate,
)

__all__ = [
    "ChoiceExample", "Judge", "LMJudge", "PairJudge", "RewardModelJudge", "bootstrap_interval", "compare_runs",
    "evaluate_choices", "evaluate_gsm8k", "evaluate_lambada", "generate_responses", "lm_judge", "load_choice_tasks",
    "load_gsm8k", "load_lambada",
    "logprobs_from_hidden", "perplexity", "perplexity_of_text", "reward_model_judge", "score_choices",
    "sequence_logprobs", "sliding_windows", "token_logprobs", "wilson_interval", "win_rate",
]
