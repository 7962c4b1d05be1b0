"""Perplexity of a model on long token streams, with a sliding window.

A stream longer than the model's context cannot be scored in one forward pass. Cutting it into
disjoint chunks would score the first tokens of every chunk with almost no history, which
overstates the loss. Instead the window slides by `stride` tokens: each window re-reads
context - stride tokens it has already scored, as history, and scores only its new tokens.
So every token is scored exactly once, and (after the first window) with at least
context - stride tokens before it. stride == context gives disjoint chunks; a smaller stride
costs context / stride forward passes per `context` tokens but is closer to the true loss.

Token shards made by `llmkern data prepare` are scored by llmkern.train.inference.evaluate_run
(the `llmkern eval --run R --data SHARDS` path); this module scores in-memory streams and text.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .._modes import eval_mode
from .logprobs import logprobs_from_hidden


def sliding_windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score a stream of `length` tokens: (start, end, first_scored).

    The window reads inputs stream[start:end] (end - start <= context) and scores the targets
    stream[t] for t in (first_scored, end], each predicted from the inputs before it. Token 0 has no
    history and is never scored; tokens 1..length-1 are each scored by exactly one window.
    """
    # Checked here too, not only by perplexity(): stride or context 0 looped forever (the window never
    # moves) and stride > context left a gap, windows whose first target had no input before it.
    for name, value in (("length", length), ("context", context), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    windows = []
    last = length - 1  # the index of the last target
    scored = 0  # targets 1..scored are done
    while scored < last:
        end = min(scored + (context if scored == 0 else stride), last)
        start = max(0, end - context)
        windows.append((start, end, scored))
        scored = end
    return windows


@torch.no_grad()
def perplexity(
    model,
    tokens: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    num_bytes: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean next-token loss and perplexity of `model` (a llmkern GPT) over token streams.

    Args:
        tokens: one stream (a list of ids or a 1-D tensor) or several independent streams (a list
            of lists, or a (B, T) tensor whose rows are streams). In each stream token 0 is
            history only: prepend <|endoftext|> to score the first real token too.
        context: tokens per window; default (and at most) the model's block_size.
        stride: how far each window moves; 1 <= stride <= context, default context // 2.
        batch_size: windows per forward pass.
        num_bytes: the UTF-8 size of the text the scored tokens spell; when given, the result
            also has bits_per_byte (total loss in bits over bytes, comparable across tokenizers).
        progress: show a tqdm bar over the batches.

    Returns:
        {"loss": mean nats per scored token, "perplexity": exp(loss), "tokens": tokens scored,
         "context", "stride", "windows"} and "bits_per_byte" when num_bytes is given.
    """
    streams = _as_streams(tokens)
    # Token 0 of a stream is read but never a target, so the check of the targets (logprobs_from_hidden) misses it:
    # an id past the vocabulary (another tokenizer's) would be embedded by a padding row, or crash.
    vocab = model.config.vocab_size
    for s in streams:
        low, high = (min(s), max(s)) if s else (0, 0)
        if not 0 <= low <= high < vocab:
            bad = low if low < 0 else high
            raise ValueError(f"tokens must be ids in [0, vocab_size={vocab}) of the model, got {bad}: "
                             f"is the tokenizer the model's?")
    block = model.config.block_size
    context = block if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= block:
        raise ValueError(f"context must be an int in [1, block_size={block}], got {context!r}")
    stride = max(1, context // 2) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= context:
        raise ValueError(f"stride must be an int in [1, context={context}], got {stride!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_bytes is not None and (isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 1):
        raise ValueError(f"num_bytes must be a positive int or None, got {num_bytes!r}")

    jobs = [(i, w) for i, s in enumerate(streams) for w in sliding_windows(len(s), context, stride)]
    if not jobs:
        raise ValueError("tokens: nothing to score; each stream needs at least 2 tokens")

    device = model.device
    total_nll = 0.0  # float64 on the host: a long stream's sum loses nothing
    total_tokens = 0
    batches = range(0, len(jobs), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, unit="batch", desc="perplexity", dynamic_ncols=True)
    with eval_mode(model):
        for b in batches:
            ids, targets = _window_batch([(streams[i], w) for i, w in jobs[b : b + batch_size]])
            logp = _scored_logprobs(model, ids.to(device), targets.to(device))
            total_nll -= float(logp.double().sum())
            total_tokens += logp.numel()

    loss = total_nll / total_tokens
    result = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": total_tokens,
              "context": context, "stride": stride, "windows": len(jobs)}
    if num_bytes is not None:
        result["bits_per_byte"] = total_nll / (math.log(2) * num_bytes)
    return result


def perplexity_of_text(model, tokenizer, text: str, stride: int | None = None, context: int | None = None,
                       batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """perplexity() of a text: every token of it is scored, the first after <|endoftext|> (what every
    pretraining document follows), or after the tokenizer's begin-of-sequence token where it has one (as
    Hugging Face evaluates Llama: the document starts with it).

    With that one token as the first history token, "tokens" is len(tokenizer.encode(text)) and
    bits_per_byte covers all of the text's UTF-8 bytes.
    """
    from ..data.sequences import sequence_start

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("text is empty: nothing to score")
    history = sequence_start(tokenizer) or [tokenizer.eot_token]
    return perplexity(model, history + ids, context=context, stride=stride, batch_size=batch_size,
                      num_bytes=len(text.encode("utf-8", errors="replace")), progress=progress)


def _scored_logprobs(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(1, N) log p of the N scored targets (those that are not -1) of a batch of windows, row by row.

    The logits are made at those positions only: a window's history (context - stride of its tokens: half of
    them at the default stride) and its padding need none, and their (B, T, V) logits, made in the model's dtype
    and copied to fp32, were most of the memory at a large vocabulary (and the LM head's matmul, of the time)."""
    hidden = model.hidden_states(ids)  # (B, T, C)
    scored = targets != -1
    return logprobs_from_hidden(model, hidden[scored].unsqueeze(0), targets[scored].unsqueeze(0))


def _as_streams(tokens: object) -> list[list[int]]:
    """tokens as a list of streams (lists of ints)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must hold integer token ids, got a tensor of {tokens.dtype}")
        if tokens.dim() == 1:
            return [tokens.tolist()]
        if tokens.dim() == 2:
            return tokens.tolist()
        raise ValueError(f"tokens must be 1-D (a stream) or 2-D (B streams), got shape {tuple(tokens.shape)}")
    if not isinstance(tokens, Sequence) or isinstance(tokens, (str, bytes)):
        raise TypeError(f"tokens must be a list of token ids, a list of such lists, or a tensor; "
                        f"got {type(tokens).__name__}")
    if len(tokens) == 0:
        raise ValueError("tokens is empty")
    # numbers.Integral, not int: ids read from a NumPy array (list(array)) are np.int64, which is no int
    # and was taken for a nested stream ("'numpy.int64' object is not iterable").
    nested = not isinstance(tokens[0], numbers.Integral)
    streams = []
    for s in tokens if nested else [tokens]:
        if isinstance(s, torch.Tensor) and s.dim() == 1 and not (s.dtype.is_floating_point or s.dtype.is_complex):
            s = s.tolist()
        if isinstance(s, (str, bytes)) or not isinstance(s, Sequence):
            raise TypeError(f"tokens must be a list of token ids, or a list of such lists (or of 1-D tensors); "
                            f"got an item of type {type(s).__name__}")
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in s):
            raise TypeError("tokens must hold ints (token ids)")
        streams.append([int(t) for t in s])
    return streams


def _window_batch(windows: list[tuple[list[int], tuple[int, int, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) of some windows, right-padded; targets are -1 where not scored."""
    width = max(end - start for _, (start, end, _) in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    targets = torch.full((len(windows), width), -1, dtype=torch.long)
    for row, (stream, (start, end, first)) in enumerate(windows):
        n = end - start
        ids[row, :n] = torch.tensor(stream[start:end])
        # Input column j predicts stream[start + j + 1]; score only the targets after `first`.
        keep = first - start  # columns 0..keep-1 predict targets already scored (history)
        targets[row, keep:n] = torch.tensor(stream[first + 1 : end + 1])
    return ids, targets
