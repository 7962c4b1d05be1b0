"""The GPT: token (+ position) embeddings, pre-norm transformer blocks, a final norm and the LM head.

One class covers GPT-2 (LayerNorm, learned positions, GELU, tied embeddings, biases),
Llama-style models (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied, no biases) and
Gemma 2's and 3's features (sliding and full layers, Gemma 3's with their own RoPE bases, sandwich norms,
GeGLU, scaled embeddings, an attention scale, Gemma 2's soft caps of attention scores and logits), with sparse
mixture-of-experts MLPs in some or all layers (Mixtral's, Qwen3-MoE's); the GPTConfig says which. Every
kernel-backed piece (RMSNorm, attention, RoPE, SwiGLU) goes through llmkern.ops with config.backend, so one model
runs on each backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import _backend
from ..nn import CausalSelfAttention, GatedMLP, GeluMLP, LayerNorm, RMSNorm, RotaryCache
from ..nn.moe import MoEMLP, RouterStats, load_balancing_loss
from ..nn.rotary import check_positions
from ..ops import fused_linear_cross_entropy, reference
from ..ops._checks import FLOAT_DTYPES
from ..ops.attention import int32_doc_ids
from .config import GPTConfig

INIT_STD = 0.02  # GPT-2's initialisation


def _make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps, backend=config.backend)
    return LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias, backend=config.backend)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(.)).

    The stream's last addition is left to whoever norms it next: forward(x, branch) takes the previous
    block's MLP output `branch`, not yet added to x (None for the first block), and returns the stream
    and its own MLP output, again not added. So each norm adds a branch to the stream and norms the sum
    in one pass (norm1 the previous MLP's, norm2 the attention's; the model's final norm the last one)
    and no add runs by itself. The stream keeps its dtype (fp32 under autocast); the norms take the
    bf16 branches as they are.

    With config.post_norms (Gemma's sandwich norms) each branch is normed again by post_attn_norm /
    post_mlp_norm before it is handed on: the branch added to the stream is the post-normed one.
    The block's attention has its layer's window (config.layer_window); `rotary` is the tables of its kind.
    In a MoE layer (config.is_moe_layer) the MLP is a MoEMLP, and forward returns its RouterStats third (None in
    a dense layer): returned rather than kept on the module, so that a checkpointed block's recomputation in the
    backward pass cannot count them again.
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.norm1 = _make_norm(config)
        self.attn = CausalSelfAttention(
            config.n_embd, config.n_head, config.n_kv_head, bias=config.bias, qkv_bias=config.qkv_bias,
            dropout=config.dropout, backend=config.backend, layer_idx=layer_idx, head_dim=config.head_dim,
            qk_norm=config.qk_norm, norm_eps=config.norm_eps, rope_dim=config.rope_dim,
            window=config.layer_window(layer_idx), scale=config.attn_scale, softcap=config.attn_softcap,
        )
        self.post_attn_norm = _make_norm(config) if config.post_norms else None
        self.norm2 = _make_norm(config)
        self.mlp = _make_mlp(config, layer_idx)
        self.post_mlp_norm = _make_norm(config) if config.post_norms else None

    @property
    def sliding(self) -> bool:
        """Whether this layer's attention has a sliding window (and so takes the local RoPE tables, if any)."""
        return self.attn.window is not None

    def forward(self, x, branch=None, rotary=None, attn_mask=None, cache=None, doc_ids=None):
        if branch is None:
            normed = self.norm1(x)
        else:
            normed, x = self.norm1(branch, residual=x)
        a = self.attn(normed, rotary, attn_mask, cache, doc_ids)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        normed, x = self.norm2(a, residual=x)
        routing = None
        if isinstance(self.mlp, MoEMLP):
            m, routing = self.mlp(normed)
        else:
            m = self.mlp(normed)
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return x, m, routing


def _make_mlp(config: GPTConfig, layer_idx: int) -> nn.Module:
    if config.is_moe_layer(layer_idx):
        return MoEMLP(config.n_embd, config.expert_hidden_size, config.n_experts, config.experts_per_token,
                      config.norm_topk_prob, config.dropout, config.backend)
    if config.mlp == "gelu":
        return GeluMLP(config.n_embd, config.hidden_size, config.bias, config.dropout)
    activation = "silu" if config.mlp == "swiglu" else "gelu_tanh"
    return GatedMLP(config.n_embd, config.hidden_size, config.bias, config.dropout, config.backend, activation)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.rotary = (
            RotaryCache(config.head_dim, config.block_size, config.rope_theta, config.rope_scaling, config.rope_dim)
            if config.pos == "rope" else None
        )
        # The sliding layers' own tables (Gemma 3's local base), unscaled; None: they take self.rotary's.
        self.rotary_local = (
            RotaryCache(config.head_dim, config.block_size, config.rope_local_theta, None, config.rope_dim)
            if config.rope_local_theta is not None else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = _make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # The load-balancing loss of the last forward pass in training mode (detached, for logging), None before
        # one or without MoE layers; see forward.
        self.aux_loss: torch.Tensor | None = None
        self.init_weights()

    def _apply(self, fn, recurse=True):
        # to_empty() (a model built on the meta device, say) gives each module a new Parameter of its
        # own: the tied lm_head would be a second, separately trained table. Tie them again.
        super()._apply(fn, recurse)
        if self.config.tie_embeddings and self.lm_head.weight is not self.wte.weight:
            self.lm_head.weight = self.wte.weight
        return self

    # --- initialisation -----------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) weights, zero biases, unit norms; the projections that write
        into the residual stream get std 0.02 / sqrt(2 * n_layer), so that the stream's variance
        does not grow with depth; the MoE experts' weights likewise (their proj as the residual projection),
        and their routers N(0, 0.02). Also rebuilds the RoPE tables (after to_empty(), say)."""
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_proj = name.endswith("attn.proj") or name.endswith("mlp.proj")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_proj else INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RotaryCache):
                module.reset_tables()
            if isinstance(module, MoEMLP):  # its router is an nn.Linear, initialised above
                module.reset_parameters(proj_std=residual_std)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None).

        loss is the mean next-token cross-entropy over the targets (B, T) that are not -1.
        With targets and config.fused_loss (on a backend other than torch), the LM head and the
        loss run fused in chunks and the logits are never made: forward returns (None, loss).
        doc_ids (B, T), for rows packed with several documents: a token attends only to earlier
        tokens of its own document, and positions restart at 0 at each document's first token,
        so each document is processed as if it were alone.
        In training mode (self.training) a model with MoE layers adds config.router_aux_loss_coef times their
        load-balancing loss (llmkern.nn.load_balancing_loss) to the loss, and keeps it, detached, in self.aux_loss;
        in eval mode the loss is the cross-entropy alone (validation loss and perplexity stay comparable).
        token_mask (B, T) bool, True at the real tokens of a padded batch: the load-balancing loss averages over
        those only (transformers' attention_mask does that to it). It changes nothing else: right padding needs
        no attention mask (a real token never attends to the padding after it), and targets of -1 leave the
        padding out of the cross-entropy. None: every token is real.
        """
        _check_forward_args(idx, targets, doc_ids, self.config.block_size, self.config.vocab_size, token_mask)
        hidden, aux = self._hidden_states_and_aux_loss(idx, token_mask, doc_ids)  # (B, T, n_embd)
        logits, loss = self._logits_and_loss(hidden, targets)
        if aux is not None and loss is not None and self.config.router_aux_loss_coef > 0:
            loss = loss + self.config.router_aux_loss_coef * aux
        return logits, loss

    def hidden_states_with_aux_loss(
        self, idx: torch.Tensor, token_mask: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the final-normed hidden states (B, T, n_embd) of idx (B, T), the load-balancing loss or None).

        The training forward pass of a caller that makes its own loss from the hidden states (DPO's log-probs,
        a classifier's or reward model's head, PPO's policy and values, GRPO's policy), as forward's is for the LM
        loss: the load-balancing loss of the MoE layers over the real tokens (token_mask, see forward), kept
        detached in self.aux_loss, in training mode; None in eval mode or without MoE layers. Unweighted: the
        caller adds config.router_aux_loss_coef times it to its loss, as forward does. doc_ids as forward's.
        """
        _check_forward_args(idx, None, doc_ids, self.config.block_size, self.config.vocab_size, token_mask)
        return self._hidden_states_and_aux_loss(idx, token_mask, doc_ids)

    def _hidden_states_and_aux_loss(
        self, idx: torch.Tensor, token_mask: torch.Tensor | None, doc_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states_with_aux_loss of checked arguments."""
        positions = None
        if doc_ids is not None:
            positions = positions_in_documents(doc_ids)
            doc_ids = int32_doc_ids(doc_ids)  # once here, not in each layer's attention
        hidden, routing = self._hidden_states_and_routing(idx, positions, doc_ids=doc_ids)
        if not (self.training and routing):
            return hidden, None
        aux = load_balancing_loss(routing, token_mask)
        self.aux_loss = aux.detach()
        return hidden, aux

    def _logits_and_loss(self, hidden: torch.Tensor, targets: torch.Tensor | None):
        """(logits, cross-entropy loss or None) of the final hidden states; see forward. With config.logit_softcap
        both are of the capped logits (as transformers' Gemma 2 computes its loss)."""
        vocab, padded = self.config.vocab_size, self.config.padded_vocab_size
        loss_backend = None if targets is None else self._fused_loss_backend(hidden.device, hidden.dtype)
        if loss_backend is not None:
            # The padding rows of the output layer are left out, so they get no probability. The op
            # takes the whole weight and writes their (zero) gradient itself: slicing the weight here
            # would make autograd zero-fill and copy another weight-sized gradient each step.
            loss = fused_linear_cross_entropy(
                hidden, self.lm_head.weight, targets, ignore_index=-1, backend=loss_backend, num_classes=vocab,
                softcap=self.config.logit_softcap,
            )
            return None, loss
        logits = self.lm_head(hidden)  # (B, T, padded_vocab_size)
        if self.config.logit_softcap is not None:
            logits = reference.soft_cap(logits, self.config.logit_softcap)
        if targets is None:
            return logits[..., :vocab], None
        if padded > vocab:
            # -inf on the padding columns gives them no probability: the exact loss over the real
            # vocabulary, without copying the logits to cut the columns off (a GB at GPT-2 scale).
            logits[..., vocab:] = float("-inf")
        loss = F.cross_entropy(logits.view(-1, padded).float(), targets.reshape(-1).long(), ignore_index=-1)
        return logits[..., :vocab], loss

    def _fused_loss_backend(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """The kernel backend ("cuda" or "triton") of the fused LM head + cross-entropy of hidden states
        of `dtype` on `device`, or None for the plain loss (fused_loss off, the torch backend, or no
        kernels that run here). A config.logit_softcap is the op's softcap."""
        if not self.config.fused_loss:
            return None
        backend = self.config.backend or _backend.get_backend()
        if backend == "auto":
            # The op's own "auto" test: its kernels take 32- and 16-bit floats (a float64 model's loss
            # stays with torch, where the explicit backend returned here would be refused).
            backend = _backend.resolve(
                "fused_linear_cross_entropy", "auto", device, fits=lambda b: dtype in FLOAT_DTYPES
            )
        if backend == "torch" or not _backend.can_run(backend, "fused_linear_cross_entropy", device):
            return None
        return backend

    def hidden_states(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache=None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states (B, T, n_embd) of idx (B, T).

        positions (B, T), attn_mask (B, 1, T, Tk) and cache are for generation (left-padded
        prompts and the KV cache, see generate.py); doc_ids (B, T) masks packed documents (see
        forward). By default token t is at position t and attends causally to tokens 0..t; with a
        cache holding n tokens, at position n + t, attending to the n cached tokens and causally.
        """
        return self._hidden_states_and_routing(idx, positions, attn_mask, cache, doc_ids)[0]

    def _hidden_states_and_routing(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache=None,
        doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[RouterStats]]:
        """hidden_states' hidden states, and the RouterStats of each MoE layer (in order; [] without any): those
        of the (B, T) tokens of idx, flattened row by row."""
        t = idx.size(1)
        if positions is None and cache is not None:
            start = cache.length
            if start + t > self.config.block_size:
                raise ValueError(f"positions {start} to {start + t - 1} (the cache holds {start} tokens, idx has {t}) "
                                 f"go past block_size={self.config.block_size}")
            positions = torch.arange(start, start + t, device=idx.device)
        if positions is None and t > self.config.block_size:
            # The position tables end there: on a GPU the learned lookup would fail in a device assert.
            raise ValueError(f"idx has {t} tokens per row; the model takes 1 to block_size={self.config.block_size}")
        vocab = self.config.vocab_size
        if vocab < self.config.padded_vocab_size:
            # An id in [vocab_size, padded_vocab_size) would read a padding row of the embedding, a plausible
            # answer to a wrong input: sent past the table, it fails the lookup as any id >= padded_vocab_size
            # does (an IndexError on the CPU, a device assert on a GPU), without the GPU wait of a host check.
            idx = idx.masked_fill(idx >= vocab, self.config.padded_vocab_size)
        x = self._scaled(self.wte(idx))  # (B, T, C)
        rotary = local_rotary = None
        if self.wpe is not None:
            if positions is None:
                pos = torch.arange(t, device=idx.device)
            else:  # checked as the RoPE tables check theirs: a clear error, not the lookup's
                pos = check_positions(positions, self.config.block_size)
            x = x + self.wpe(pos)
        else:
            rotary = local_rotary = self.rotary(positions, t)
            if self.rotary_local is not None:
                local_rotary = self.rotary_local(positions, t)
        x = self.drop(x)
        use_checkpoints = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        branch = None  # the last block's MLP output, not yet added to the stream x (see Block)
        routing = []  # the MoE layers' RouterStats, for forward's load-balancing loss
        for block in self.blocks:
            tables = local_rotary if block.sliding else rotary
            if use_checkpoints:
                x, branch, stats = checkpoint(
                    block, x, branch, tables, attn_mask, cache, doc_ids, use_reentrant=False
                )
                # Whole between checkpoints: each keeps one input tensor, not the stream and a branch.
                x, branch = x + branch, None
            else:
                x, branch, stats = block(x, branch, tables, attn_mask, cache, doc_ids)
            if stats is not None:
                routing.append(stats)
        if cache is not None:
            cache.advance(t)
        hidden = self.norm_f(x) if branch is None else self.norm_f(branch, residual=x)[0]
        return hidden, routing

    def _scaled(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The token embeddings times config.embed_scale, rounded to their dtype first as transformers' Gemma does
        (sqrt(n_embd) in bf16 is not sqrt(n_embd)); unchanged without one."""
        if self.config.embed_scale is None:
            return embeddings
        scale = torch.full((), self.config.embed_scale, dtype=embeddings.dtype, device=embeddings.device)
        return embeddings * scale

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary (the padding rows of the output layer are cut off), soft-capped with
        config.logit_softcap, as forward's are (so generation, evaluation and log-probabilities see the capped
        ones)."""
        logits = self.lm_head(hidden)[..., : self.config.vocab_size]
        if self.config.logit_softcap is not None:
            logits = reference.soft_cap(logits, self.config.logit_softcap)
        return logits

    # --- accounting -----------------------------------------------------------------------------

    def num_parameters(self, non_embedding: bool = False, active: bool = False) -> int:
        """All parameters (a tied embedding counted once, padding rows included).

        non_embedding=True leaves out the lookup tables that do no matmul work: the position
        embeddings and, when untied, the input token embeddings (a tied table stays in, as the
        output layer). active=True counts, of each MoE layer's experts, only the experts_per_token
        that a token runs (k of E; the router in full). non_embedding and active together give the N
        of the 6N FLOPs-per-token rule.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        if active:
            n -= sum(_idle_expert_parameters(module) for module in self.modules() if isinstance(module, MoEMLP))
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6N for the matmul weights, plus
        12 * n_layer * n_head * head_dim * seq_len for attention's scores and weighted sum (PaLM's count,
        which does not halve for the causal mask; n_head * head_dim is n_embd unless head_dim says
        otherwise, as Qwen3's does). seq_len defaults to block_size. A layer's sliding window shorter than seq_len
        scales its attention term by the share of the causal (query, key) pairs it keeps (see
        _windowed_share): the kernels skip the rest, and MFU would count work never done. N counts only the
        parameters active per token (num_parameters' active): of a MoE layer's E experts, the k a token runs."""
        seq_len = self.config.block_size if seq_len is None else seq_len
        cfg = self.config
        attention_width = cfg.n_head * cfg.head_dim  # the queries' width: what the scores and the sum run over
        windows = [cfg.layer_window(i) for i in range(cfg.n_layer)]
        layers = sum(1.0 if w is None or w >= seq_len else _windowed_share(w, seq_len) for w in windows)
        attention = 12 * layers * attention_width * seq_len
        return 6 * self.num_parameters(non_embedding=True, active=True) + attention

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups for an AdamW: decay on matrices (matmul weights, embeddings, the MoE experts'
        stacked 3-D weights), none on the vectors (norm scales, biases)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device


def _idle_expert_parameters(moe: MoEMLP) -> int:
    """The parameters of the experts a token does not run: E - k of each MoE layer's E."""
    per_expert = (moe.gate_up.numel() + moe.proj.numel()) // moe.n_experts
    return (moe.n_experts - moe.experts_per_token) * per_expert


def _windowed_share(window: int, seq_len: int) -> float:
    """The share of a causal sequence's (query, key) pairs a sliding window keeps: the query at position p sees
    min(window, p + 1) keys instead of p + 1, summed over the seq_len positions. Scaling PaLM's count (which
    counts seq_len keys for every query, twice the causal pairs) by it keeps that convention's factor, so a
    windowed model's MFU compares with a plain one's."""
    causal_pairs = seq_len * (seq_len + 1) // 2
    windowed_pairs = window * (window + 1) // 2 + (seq_len - window) * window  # the first `window` queries see p + 1
    return windowed_pairs / causal_pairs


def positions_in_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its document: how many earlier tokens of its row share its id.
    For packed rows (a document one run of positions) it restarts at 0 where doc_ids changes; an id that
    comes back later in a row counts on, since attention takes all its tokens as one document."""
    values, order = doc_ids.sort(dim=1, stable=True)  # each id's tokens together, in row order
    steps = torch.arange(doc_ids.size(1), device=doc_ids.device).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    run_start = torch.where(starts, steps, 0).cummax(dim=1).values  # where each token's id begins, sorted
    return torch.empty_like(order).scatter_(1, order, steps - run_start)


def _check_forward_args(idx: object, targets: object, doc_ids: object, block_size: int, vocab_size: int,
                        token_mask: object = None) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must hold int64 (or int32) token ids; got {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"idx must be 2-D (batch, time); got shape {tuple(idx.shape)}")
    if not 1 <= idx.size(1) <= block_size:
        raise ValueError(f"idx has {idx.size(1)} tokens per row; the model takes 1 to block_size={block_size}")
    for name, t in (("targets", targets), ("doc_ids", doc_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 (or int32) tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.shape != idx.shape:
            raise ValueError(f"{name} must have idx's shape {tuple(idx.shape)}; got {tuple(t.shape)}")
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask must be a bool tensor (True at real tokens), got "
                            f"{getattr(token_mask, 'dtype', type(token_mask).__name__)}")
        if token_mask.shape != idx.shape:
            raise ValueError(f"token_mask must have idx's shape {tuple(idx.shape)}; got {tuple(token_mask.shape)}")
    # Ids in the padding of the vocabulary [vocab_size, padded_vocab_size) would give an answer (the
    # padding rows exist) to a wrong input. Checked on the host where that costs no GPU wait; on a GPU,
    # hidden_states makes such an id fail the embedding lookup, and the loss is NaN or inf.
    if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(idx))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"idx holds token id {low if low < 0 else high}; token ids are in [0, {vocab_size})")
        if targets is not None and targets.device.type == "cpu":
            bad = targets[(targets != -1) & ((targets < 0) | (targets >= vocab_size))]
            if bad.numel():
                raise ValueError(f"targets holds {int(bad[0])}; targets are token ids in [0, {vocab_size}), "
                                 "or -1 (ignored)")
