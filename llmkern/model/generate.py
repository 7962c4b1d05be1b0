"""Text generation: greedy, temperature, top-k and top-p sampling, with a KV cache.

A batch of prompts of different lengths is left-padded: every row ends at the same column, so
each step appends one column. Padding is masked out of attention, and positions count only
a row's real tokens, so a padded row gives the same tokens as that prompt alone.

With the cache the prompt is run once (prefill) and each later step feeds one token. A
sequence never exceeds block_size: the prompt is cropped to its last block_size tokens, and
once the cache is full each step reruns the model on the last block_size tokens (a sliding
window, as generation without the cache always does). keep_first keeps each row's first tokens in front of
that window: a begin-of-sequence token (Llama 3's, Gemma's) is an attention sink the model always read in
training, and llmkern.data.sequences.cut_left keeps it so when it cuts a prompt.

A model's own sliding window (GPTConfig.sliding_window) is another thing: each sliding layer's attention
(GPTConfig.layer_window) masks the keys past it, in the masks made here too, and its cache keeps only the last
`window` tokens (a ring buffer, see KVCache): O(window) memory per sliding layer rather than O(capacity). The
masks here stay over every column since the first cached one; the attention layer picks the columns each ring
slot holds.

A longrope model (Phi-3's) whose block_size is past its original context takes long_factor once the sequence
(the batch's longest row) is past it, as transformers does: the step that first goes past recomputes the
cache, whose keys took short_factor, as transformers' Phi3ForCausalLM.generate does. So there a row's tokens
may depend on the longest row in its batch.

A seed fixes each prompt's sample whatever else is in the batch: row i draws its numbers from a
private stream keyed by (seed, i), so prompts[0] samples as it would alone, and a row's tokens
change only where its logits do (batching may change them by rounding).
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Callable

import torch

from .._modes import eval_mode
from .gpt import GPT
from .kv_cache import KVCache


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop: Callable[[list[int]], bool] | None = None,
    keep_first: int = 0,
    first_row: int = 0,
) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens.

    Args:
        model: a GPT (put in eval mode for the call, then restored).
        prompts: token-id lists (lengths may differ), or a (B, T) integer tensor.
        max_new_tokens: how many tokens to add at most.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities add up to top_p (nucleus).
        eos_token: a row stops after emitting it (it is kept in the output).
        seed: makes sampling reproducible, prompt by prompt: row i draws from its own stream, keyed by
            (seed, first_row + i), so its tokens depend on its prompt, the seed and i, not on the other prompts
            (prompts[0] samples as it would alone), and identical prompts get different samples.
            Only where batching changes a row's logits by rounding may a draw differ. None uses
            torch's global RNG.
        use_cache: keep keys and values across steps (fast); False reruns the whole sequence.
        stop: a function of a row's new tokens (a list, after each token); the row stops once it
            returns true. How a caller stops at a text that spans several tokens (ChatML's <|im_end|>).
        keep_first: where a row (prompt and new tokens) is longer than block_size, the model reads its first
            keep_first tokens, then its last block_size - keep_first (else its last block_size). 1 for a
            tokenizer with a begin-of-sequence token (len(llmkern.data.sequences.sequence_start(tokenizer))),
            which each prompt starts with; an int in [0, block_size).
        first_row: the index of prompts[0] in a larger batch sampled a part at a time: row i draws from the
            stream keyed by (seed, first_row + i), so the parts draw what one call of the whole batch would (up to
            batching's rounding, and a longrope model's tables, which a call picks by its longest row;
            llmkern.finetune.ppo.sample_responses samples its rollouts so). An int >= 0.

    Returns:
        One list per prompt: the prompt followed by its new tokens.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a llmkern.model.GPT, got {type(model).__name__}")
    rows = _prompt_rows(prompts, model.config.vocab_size)
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, eos_token, seed, use_cache)
    max_new_tokens = int(max_new_tokens)  # a NumPy int as Python's: sizes the buffers and the KV cache
    if eos_token is not None and not 0 <= eos_token < model.config.vocab_size:
        # The model never emits such an id (nor a padding row's): the rows would never stop, silently.
        raise ValueError(f"eos_token must be a token id in [0, {model.config.vocab_size}), got {eos_token}")
    if stop is not None and not callable(stop):
        raise TypeError(f"stop must be None or a function of a row's new tokens, got {stop!r}")
    _check_keep_first(keep_first, model.config.block_size)
    if not _is_int(first_row) or first_row < 0:
        raise ValueError(f"first_row must be an int >= 0, got {first_row!r}")
    keep_first = int(keep_first)  # a NumPy int as Python's, for the slices
    device = model.device
    length = max(len(r) for r in rows)  # the columns filled so far: the longest prompt's, then one a step
    most_columns = length + max_new_tokens
    tokens, valid = _left_pad(rows, min(max_new_tokens, _FIRST_ROOM), device)
    draw_uniforms = _uniform_draws(seed, range(first_row, first_row + len(rows)), device)
    outputs = [list(r) for r in rows]
    finished = [False] * len(rows)
    decoder = _CachedDecoder(model, max_new_tokens, keep_first) if use_cache else None
    with eval_mode(model):
        for _ in range(max_new_tokens):
            if decoder is not None:
                logits = decoder.next_logits(tokens[:, :length], valid[:, :length])
            else:
                logits = _window_logits(model, tokens[:, :length], valid[:, :length], keep_first)
            _refuse_nan(logits, finished, outputs, rows)
            uniforms = draw_uniforms() if temperature > 0 else None  # greedy draws nothing
            next_tokens = _sample(logits.float(), temperature, top_k, top_p, uniforms)
            # A finished row still runs with the batch, but its token is never used: it is fed the padding
            # id. Its own sample was fed before, and where its logits had gone NaN or inf (which _refuse_nan
            # allows once a row is done) sampling gave the id vocab_size, which failed the whole batch at
            # the next embedding lookup. The running rows' tokens are unchanged: rows do not mix in the
            # model, and every row still draws its uniform each step (a finished row's own private stream,
            # or its element of the one torch.rand of the whole batch), so no row's draws shift.
            if any(finished):
                done = torch.tensor(finished, device=device)
                next_tokens = next_tokens.masked_fill(done, _PAD_ID)
            if length == tokens.size(1):
                tokens, valid = _grown(tokens, valid, most_columns)
            tokens[:, length] = next_tokens
            valid[:, length] = True
            length += 1
            for i, tok in enumerate(next_tokens.tolist()):
                if not finished[i]:
                    outputs[i].append(tok)
                    finished[i] = tok == eos_token or (stop is not None and bool(stop(outputs[i][len(rows[i]):])))
            if all(finished):
                break
    return outputs


# The id fed where a row has no real token (left padding, and a finished row's later steps): 0 is in
# every vocabulary, and its value does not matter, as no real token sees it.
_PAD_ID = 0


# Columns for new tokens that the buffer has at first; it doubles as they come (_grown). Allocated up front for
# max_new_tokens, a huge limit (10**9 "until eos") cost memory in proportion before the first token, or failed.
_FIRST_ROOM = 64


def _left_pad(rows: list[list[int]], room: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts left-padded into one (B, P + room) buffer, and `valid`, marking real tokens."""
    batch, longest = len(rows), max(len(r) for r in rows)
    tokens = torch.full((batch, longest + room), _PAD_ID, dtype=torch.long, device=device)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, longest - len(row) : longest] = torch.tensor(row, dtype=torch.long)
        valid[i, longest - len(row) : longest] = True
    return tokens, valid


def _grown(tokens: torch.Tensor, valid: torch.Tensor, most_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffers with twice the columns, or most_columns if fewer: the new ones padding, not valid. Doubling
    copies each token O(1) times over a generation, and leaves at most as much room unused as it has filled."""
    batch, width = tokens.shape
    extra = min(width, most_columns - width)
    tokens = torch.cat([tokens, tokens.new_full((batch, extra), _PAD_ID)], dim=1)
    valid = torch.cat([valid, valid.new_zeros(batch, extra)], dim=1)
    return tokens, valid


class NonFiniteLogitsError(RuntimeError):
    """The model gave NaN or inf logits for a running row: its weights or activations are not finite."""


def _refuse_nan(logits: torch.Tensor, finished: list[bool], outputs: list[list[int]], rows: list[list[int]]) -> None:
    """Greedy's argmax takes a NaN for the largest logit and gives its id as a token, silently (and
    sampling would draw from NaN probabilities): a running row's NaN logits are an error. So is an
    infinite logit (an overflow, in float16 say): sampling subtracts the largest logit, inf - inf is NaN,
    and the inverse CDF of NaN probabilities gave the id vocab_size, a token that does not exist."""
    nan, inf = torch.stack((logits.isnan().any(dim=-1), logits.isinf().any(dim=-1))).tolist()  # one wait
    for i in range(len(finished)):
        if (nan[i] or inf[i]) and not finished[i]:
            raise NonFiniteLogitsError(f"the model's logits hold {'NaN' if nan[i] else 'inf'} for prompts[{i}] at "
                                       f"new token {len(outputs[i]) - len(rows[i])}: its weights or activations "
                                       f"are not finite")


def _uniform_draws(seed: int | None, row_ids: range, device: torch.device) -> Callable[[], torch.Tensor]:
    """A function giving the next step's uniforms in [0, 1), (B,) float64 on `device`, for _sample; row_ids are
    the B rows' indices in their whole batch (generate's first_row onwards).

    seed None: torch's global RNG. Otherwise row i has a private stream (Python's Mersenne Twister keyed
    by (seed, row_ids[i])) and its k-th token uses the stream's k-th number, so a row's draws depend on the seed
    and its index alone: never on the batch's size, its other prompts, or when the other rows stop.

    Why one number per row on the host rather than a torch.Generator per row: per-row generators would
    cost B tiny launches every decode step on a GPU (a multinomial or exponential_ per row). Here a step is
    B host draws (tens of ns each) and one (B,) copy, and the sampling itself (_sample's inverse CDF) stays
    one batched computation. A counter-based hash of (seed, row, step) computed on the device would avoid
    the copy too, but needs a hand-written integer hash; the copy is tiny, and each step already waits for
    its tokens on the host. The numbers are also the same on every device.
    """
    if seed is None:
        return lambda: torch.rand(len(row_ids), dtype=torch.float64, device=device)
    streams = [random.Random(f"llmkern.generate:{seed}:{i}") for i in row_ids]
    return lambda: torch.tensor([s.random() for s in streams], dtype=torch.float64, device=device)


class _CachedDecoder:
    """Prefill once (once more where a longrope model's tables switch, see _longrope_switches), then one token a
    step against the KV cache; a sliding window once it is full."""

    def __init__(self, model: GPT, max_new_tokens: int, keep_first: int):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.keep_first = keep_first  # as generate's
        self.cache: KVCache | None = None  # None before the prefill, and again once it is full
        self.prefilled = False
        self.start = 0  # the column of the first cached token
        self.next_pos: torch.Tensor | None = None  # (B,) the position of each row's next token
        self.steps = 0  # next_logits calls so far, the current one counted: the tokens sampled, with the next
        self.short_context = _longrope_short_context(model)
        self.cached_short = False  # the cached keys took longrope's short_factor

    def next_logits(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if not self.prefilled or self._longrope_switches():
            return self._prefill(tokens, valid)
        if self.cache is None or self.cache.full:
            # From here on each step reruns the window: the cache, every layer's keys and values of the whole
            # context (GBs at 7B scale), is let go rather than held beside the window's activations.
            self.cache = None
            return _window_logits(self.model, tokens, valid, self.keep_first)
        window_valid = valid[:, self.start :]
        attn_mask = window_valid[:, None, None, :]  # (B, 1, 1, Tk): the new token sees every real token
        positions = self.next_pos[:, None]
        hidden = self.model.hidden_states(tokens[:, -1:], positions, attn_mask, self.cache)
        self.next_pos = self.next_pos + 1
        return self.model.head(hidden[:, -1])

    def _prefill(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        block = self.model.config.block_size
        # A prompt past block_size fills the cache at once (its capacity is block_size), so the decode steps, which
        # read columns start.. of `valid`, never follow a prompt that _model_window rearranged.
        self.start = max(0, tokens.size(1) - block)
        window, window_valid = _model_window(tokens, valid, block, self.keep_first)
        # The tokens still to sample, all but the last fed back, need room in the cache.
        capacity = min(block, window.size(1) + self.max_new_tokens - self.steps)
        config = self.model.config
        windows = [config.layer_window(i) for i in range(config.n_layer)]  # the sliding layers' caches are rings
        self.cache = KVCache(config.n_layer, capacity, windows)
        self.prefilled = True
        positions, attn_mask = _positions_and_mask(window_valid)
        hidden = self.model.hidden_states(window, positions, attn_mask, self.cache)
        self.next_pos = window_valid.sum(dim=1)
        # the prefill's sequence (its longest row) takes the short tables up to short_context tokens
        self.cached_short = self.short_context is not None and int(self.next_pos.max()) <= self.short_context
        return self.model.head(hidden[:, -1])

    def _longrope_switches(self) -> bool:
        """Whether this step is the first whose sequence (the longest row's tokens, this one too) is past longrope's
        original context while the cached keys took short_factor: transformers' Phi3ForCausalLM.generate then
        recomputes the cache ("enforce re-compute cache"), all keys taking long_factor, as a rerun without a cache
        does. Kept, the keys would mix short_factor and long_factor rotations."""
        if not self.cached_short or self.cache is None or self.cache.full:  # a full cache: the window is rerun
            return False
        return int(self.next_pos.max()) >= self.short_context  # this step's sequence: max(next_pos) + 1 tokens


def _longrope_short_context(model: GPT) -> int | None:
    """The original context of a model whose RoPE tables switch from longrope's short_factor to its long_factor
    within block_size (llmkern.nn.rotary.RotaryCache's short tables); None for any other model."""
    rotary = getattr(model, "rotary", None)
    short_cos = getattr(rotary, "short_cos", None)
    return None if short_cos is None else short_cos.size(0)


def _window_logits(model: GPT, tokens: torch.Tensor, valid: torch.Tensor, keep_first: int) -> torch.Tensor:
    """Logits of the next token from the last block_size columns (and each long row's first keep_first tokens),
    without a cache."""
    window, window_valid = _model_window(tokens, valid, model.config.block_size, keep_first)
    if bool(window_valid.all()):  # no padding: the model's ordinary causal forward
        hidden = model.hidden_states(window)
    else:
        positions, attn_mask = _positions_and_mask(window_valid)
        hidden = model.hidden_states(window, positions, attn_mask)
    return model.head(hidden[:, -1])


def _model_window(tokens: torch.Tensor, valid: torch.Tensor, block: int, keep_first: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model reads of left-padded rows (B, T) and their `valid`: the last block columns, where a row of
    more than block real tokens has its first keep_first tokens in front of its last block - keep_first."""
    if tokens.size(1) <= block:
        return tokens, valid
    window, window_valid = tokens[:, -block:], valid[:, -block:]
    if keep_first == 0:
        return window, window_valid
    t = tokens.size(1)
    lengths = valid.sum(dim=1)  # (B,) each row's real tokens, the last `lengths` columns
    cut = lengths > block  # such a row fills the window with real tokens: its valid stays all true
    # the columns of each row's first tokens (clamped for a short row, whose columns are not used)
    first = ((t - lengths)[:, None] + torch.arange(keep_first, device=tokens.device)).clamp(max=t - 1)
    head = torch.where(cut[:, None], tokens.gather(1, first), window[:, :keep_first])
    return torch.cat([head, window[:, keep_first:]], dim=1), window_valid


def _positions_and_mask(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For left-padded rows (B, T): each token's position among its row's real tokens, and the
    (B, 1, T, T) mask of keys each query sees: real tokens at or before it. A padding query sees
    itself only, so its softmax has a key (its output is never used)."""
    t = valid.size(1)
    # A padding column before a row's first token would be at position -1, which the position tables
    # refuse (llmkern.nn.rotary.check_positions): clamped to 0 on purpose, and harmless there, since no
    # real token's query sees a padding key and a padding query's output is never used.
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=valid.device)
    attn_mask = (causal & valid[:, None, :]) | eye
    return positions, attn_mask[:, None]


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    uniforms: torch.Tensor | None,
) -> torch.Tensor:
    """One token per row of logits (B, V); row i's is drawn with uniforms[i] (in [0, 1), unused when greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # The largest logit is made 0 first: a tiny temperature then sends the others to -inf (greedy, its
    # limit), where dividing the logits themselves overflows to inf and the softmax gives NaN.
    # A temperature below float32's smallest value would round to 0 in the division (0 / 0 = NaN for the
    # largest logit): it is clamped to the smallest normal one, where any gap gives a token no probability.
    temperature = max(_as_float(temperature), torch.finfo(logits.dtype).tiny)
    # Tokens are ranked by the logits themselves: a huge temperature (inf, or past float32's range) makes
    # every scaled logit 0, a tie that would let top-k keep all tokens and top-p the first ids.
    raw = logits
    logits = (raw - raw.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = raw.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(raw < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        order = raw.argsort(dim=-1, descending=True)  # top-k's dropped tokens (the smallest) come last
        probs = logits.gather(-1, order).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the ones before it suffice.
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return _inverse_cdf(logits.softmax(dim=-1), uniforms)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """For each row of probs (B, V), the first token whose cumulative probability exceeds uniforms[i] (B,)
    times the row's total. A row's token depends on that row alone (torch.multinomial would draw every
    row from one stream), and a token of probability 0 is never drawn: the cumulative sum steps past the
    target only at a token that adds to it. Summed in float64, so that a token far below float32's
    resolution near 1 (p < 6e-8 of a large vocabulary) keeps its chance."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total, which no token's cumulative sum exceeds.
    target = torch.minimum(uniforms[:, None] * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def _as_float(temperature: float) -> float:
    """A temperature as a float: an int past float's range (10**400) is inf, the same limit (uniform), where
    torch's division refused an int past int64's ("int too big to convert")."""
    try:
        return float(temperature)
    except OverflowError:
        return math.inf


def _prompt_rows(prompts: object, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise ValueError(f"a prompts tensor must be 2-D (B, T) of integer ids; got {prompts.dtype} {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a non-empty list of token-id lists, or a (B, T) tensor")
    rows = []
    for i, row in enumerate(prompts):
        if not isinstance(row, (list, tuple)) or not row:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids; got {row!r:.60}")
        for tok in row:
            if not _is_int(tok) or not 0 <= tok < vocab_size:
                raise ValueError(f"prompts[{i}] holds {tok!r}; token ids are ints in [0, {vocab_size})")
        rows.append([int(tok) for tok in row])  # NumPy ints as Python's: the output rows hold one kind
    return rows


# numbers.Integral and numbers.Real, not int and float, as llmkern's ops take them: a NumPy scalar (a token id of
# list(array), an np.float32 temperature of a sweep) is a number too. A bool is not, NumPy's neither.
def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_args(max_new_tokens, temperature, top_k=None, top_p=None, eos_token=None, seed=None,
                        use_cache=True) -> None:
    """Raise ValueError or TypeError, naming the argument, for one that generate() refuses (whatever the model:
    eos_token's range is checked against its vocabulary there). For a caller that would rather know before it
    loads a model."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not _is_real(temperature) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if eos_token is not None and not _is_int(eos_token):
        raise TypeError(f"eos_token must be None or an int, got {eos_token!r}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be None or an int, got {seed!r}")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")


def _check_keep_first(keep_first, block_size: int) -> None:
    if not _is_int(keep_first):
        raise TypeError(f"keep_first must be an int in [0, block_size={block_size}), got {keep_first!r}")
    if not 0 <= keep_first < block_size:  # the window needs room for at least the last token
        raise ValueError(f"keep_first must be an int in [0, block_size={block_size}), got {keep_first}")
