"""AdamW over fused multi-tensor kernels, with the global gradient-norm clip fused in.

A drop-in for torch.optim.AdamW: the same update (decoupled weight decay, bias corrections,
eps added after sqrt(v_hat)), the same state keys ("step", "exp_avg", "exp_avg_sq"), so a
state_dict moves between the two both ways. On top of it:

- max_grad_norm: the global L2 norm of all gradients is reduced on the device (fp32
  accumulation, deterministic) and the factor min(1, max_grad_norm / (norm + 1e-6)) of
  torch.nn.utils.clip_grad_norm_ scales the gradients inside the update, which never writes
  them back. A non-finite norm skips the whole step: parameters, moments and step counts stay
  as they were, and a device counter (opt.skipped_steps) counts it. Nothing waits on the
  host, so the step can be captured in a CUDA graph. The non-finite check needs the norm,
  so it runs only when max_grad_norm is set; max_grad_norm=math.inf gives the skip and
  opt.grad_norm without clipping. Without max_grad_norm a NaN gradient propagates, as it
  does in torch.optim.AdamW, and the plain step reads no byte more than it must.
- master_weights=True: fp16/bf16 parameters get an fp32 master copy (state["master_param"])
  and fp32 moments; the update runs on the master and the parameter receives it rounded.
  fp32 parameters need no master and get none.

Backends: "cuda" (csrc/cuda/adamw.cu), "triton" (llmkern/triton/adamw.py) and "torch" (the
foreach reference llmkern.ops.reference.adamw_step). "auto" picks cuda, then triton, on a
GPU and torch on a CPU. The torch backend lives in reference.py beside every other op's
reference because it is also the definition the kernels are tested against.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .. import _backend
from ..ops import reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Group options of torch.optim.AdamW that this optimizer does not implement: a state_dict
# from torch that turns one on is refused rather than silently stepped differently.
UNSUPPORTED_TORCH_OPTIONS = ("amsgrad", "maximize", "differentiable")


@dataclass
class _GroupWork:
    """One parameter group's tensors that have gradients, as parallel lists."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]
    masters: list[torch.Tensor | None] | None
    device: torch.device
    backend: str


class AdamW(torch.optim.Optimizer):
    """AdamW with fused multi-tensor CUDA/Triton kernels and fused gradient clipping.

    Args:
        params: parameters or parameter groups (dicts with their own lr, weight_decay, ...).
        lr: learning rate, a float or a 0-d tensor (on the CPU, or on the parameters' GPU to
            keep a captured CUDA graph following a scheduler).
        betas: (beta1, beta2), each in [0, 1).
        eps: added to sqrt(v_hat); >= 0.
        weight_decay: decoupled decay, p *= 1 - lr * weight_decay; >= 0.
        max_grad_norm: clip the global gradient norm to this (> 0, math.inf allowed), and
            skip steps whose norm is not finite; None: no norm, no clip, no skip.
        master_weights: keep fp32 master weights and moments for fp16/bf16 parameters.
        backend: "auto" | "cuda" | "triton" | "torch"; None means llmkern.get_backend().
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        backend: str | None = None,
    ) -> None:
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real):
                raise TypeError(f"max_grad_norm must be a float or None, got {type(max_grad_norm).__name__}")
            if not max_grad_norm > 0:
                raise ValueError(f"max_grad_norm must be > 0 (math.inf to only skip non-finite steps), got {max_grad_norm}")
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be a bool, got {type(master_weights).__name__}")
        # Set before super().__init__, which calls add_param_group (it reads them).
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.master_weights = master_weights
        self.backend = None if backend is None else _backend._validate(backend)
        self._grad_norm: torch.Tensor | None = None  # 0-d fp32, the last step's norm
        self._clip_state: torch.Tensor | None = None  # [grad scale, 1.0 if finite else 0.0]
        self._skipped: torch.Tensor | None = None  # 0-d int64, steps skipped so far
        self._kernel_caches: dict[int, dict] = {}  # per group: the kernels' pointer tables
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _check_hyperparameters(defaults, "")
        super().__init__(params, defaults)

    # --- what a user reads ----------------------------------------------------------------

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the last step (0-d fp32 on the device), or None
        before the first step or without max_grad_norm. Reading its value syncs."""
        return self._grad_norm

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite gradient norm (reading it syncs)."""
        return 0 if self._skipped is None else int(self._skipped.item())

    # --- pickling, deepcopy ------------------------------------------------------------------

    # torch.optim.Optimizer pickles only defaults, state and param_groups: a copy lacked
    # max_grad_norm, master_weights, ... and failed at its first step. The kernels' pointer
    # tables hold the original tensors' addresses, so a copy starts without them.
    _PICKLED = ("max_grad_norm", "master_weights", "backend", "_grad_norm", "_clip_state", "_skipped")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._PICKLED})
        return state

    def __setstate__(self, state: dict) -> None:
        # Optimizer.load_state_dict calls this too, with only state and param_groups.
        super().__setstate__(state)
        for name in self._PICKLED:
            self.__dict__.setdefault(name, False if name == "master_weights" else None)
        self.__dict__.setdefault("_kernel_caches", {})

    # --- groups and state -------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)  # a generator is read once
        if len({id(p) for p in params}) != len(params):
            # the kernels would update it twice at once, racing on its memory (torch only warns)
            raise ValueError(f"param group {len(self.param_groups)}: a parameter appears twice in the group")
        super().add_param_group({**param_group, "params": params})
        try:
            self._check_group(self.param_groups[-1], f"param group {len(self.param_groups) - 1}: ")
        except (TypeError, ValueError):
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _check_group(self, group: dict, where: str) -> None:
        _check_hyperparameters(group, where)
        for option in UNSUPPORTED_TORCH_OPTIONS:
            if group.get(option, False):
                raise ValueError(f"{where}{option}=True is a torch.optim.AdamW option that llmkern AdamW does not "
                                 f"implement")
        devices = set()
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(f"{where}complex parameters are not supported; got one of dtype {p.dtype}")
            if not p.is_floating_point():
                raise TypeError(f"{where}parameters must be floating point; got one of dtype {p.dtype}")
            if p.is_sparse:
                raise TypeError(f"{where}sparse parameters are not supported")
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(f"{where}all parameters of a group must be on one device; got {sorted(map(str, devices))}")
        if self.max_grad_norm is not None:
            all_devices = {p.device for g in self.param_groups for p in g["params"]}
            if len(all_devices) > 1:
                raise ValueError(
                    "with max_grad_norm the global norm is reduced on one device, so all parameters "
                    f"must be on one device; got {sorted(map(str, all_devices))}"
                )

    def load_state_dict(self, state_dict: dict) -> None:
        for i, group in enumerate(state_dict["param_groups"]):
            for option in UNSUPPORTED_TORCH_OPTIONS:
                if group.get(option, False):
                    raise ValueError(f"param group {i} of the state_dict sets {option}=True, which llmkern AdamW does not implement")
            missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in group]
            if missing:
                raise ValueError(f"param group {i} of the state_dict lacks {', '.join(missing)}: not an AdamW state_dict")
            _check_hyperparameters({k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}, f"param group {i}: ")
        self._check_state_shapes(state_dict)
        super().load_state_dict(state_dict)
        if self.master_weights:
            self._restore_fp32_state(state_dict)
        else:
            # A master-weights optimizer's state loaded here: its master copies (cast to the parameters'
            # dtype by Optimizer.load_state_dict) would be kept and stepped in place of the parameters.
            for state in self.state.values():
                state.pop("master_param", None)
        self._kernel_caches.clear()

    def _check_state_shapes(self, state_dict: dict) -> None:
        """Refuse moments or masters of another shape than their parameter's (a state_dict of
        another model): the kernels would read and write past the end of the smaller tensor."""
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)
        ):
            return  # Optimizer.load_state_dict refuses it with its own message
        for i, (group, saved_group) in enumerate(zip(self.param_groups, saved_groups)):
            for j, (p, saved_id) in enumerate(zip(group["params"], saved_group["params"])):
                for key, value in saved_state.get(saved_id, {}).items():
                    if key != "step" and torch.is_tensor(value) and value.shape != p.shape:
                        raise ValueError(
                            f"param group {i}, parameter {j}: the state_dict's {key} has shape {tuple(value.shape)}, "
                            f"the parameter {tuple(p.shape)}"
                        )

    def _restore_fp32_state(self, state_dict: dict) -> None:
        """Optimizer.load_state_dict casts every state tensor to its parameter's dtype; the
        fp32 moments and master weights of half-precision parameters are put back in fp32."""
        saved_state = state_dict["state"]
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, saved_id in zip(group["params"], saved_group["params"]):
                if p.dtype not in HALF_DTYPES or saved_id not in saved_state:
                    continue
                for key in ("exp_avg", "exp_avg_sq", "master_param"):
                    if key in saved_state[saved_id]:
                        value = saved_state[saved_id][key]
                        if key == "master_param" and value.dtype != torch.float32:
                            # Not a master any more: torch.optim.AdamW's load_state_dict cast it to
                            # the parameter's dtype and then stepped the parameter, not it. Stale:
                            # dropped, the next step makes a fresh one from the parameter.
                            self.state[p].pop(key, None)
                            continue
                        self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    def _prepared_state(self, p: torch.Tensor) -> dict:
        """p's state, created on first use, and moved to where the kernels want it (the step
        count as fp32 on p's device, moments in fp32 under master weights) after a load."""
        state = self.state[p]
        has_master = self.master_weights and p.dtype in HALF_DTYPES
        moment_dtype = torch.float32 if has_master else p.dtype
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
        step = state["step"]
        if not torch.is_tensor(step):
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        elif step.device != p.device or step.dtype != torch.float32:
            state["step"] = step.to(device=p.device, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            if state[key].dtype != moment_dtype or state[key].device != p.device:
                state[key] = state[key].to(device=p.device, dtype=moment_dtype)
        if has_master and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
        return state

    def _group_work(self, group: dict) -> _GroupWork | None:
        params, grads, exp_avgs, exp_avg_sqs, steps, masters = [], [], [], [], [], []
        kernels_take = True  # every parameter is one the kernels can update (float32/16/bf16, contiguous)
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if g.is_sparse:
                raise TypeError("AdamW does not support sparse gradients")
            if g.is_complex():
                raise TypeError(f"AdamW does not support complex gradients; got one of dtype {g.dtype}")
            if g.dtype != p.dtype:
                raise TypeError(f"a gradient must have its parameter's dtype {p.dtype}; got {g.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"a gradient must have its parameter's shape {tuple(p.shape)}; got {tuple(g.shape)}")
            state = self._prepared_state(p)
            kernels_take = kernels_take and p.dtype in KERNEL_DTYPES and p.is_contiguous()
            params.append(p)
            grads.append(g)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            masters.append(state.get("master_param"))
        if not params:
            return None
        device = params[0].device
        # "auto" leaves to torch a group the kernels cannot update (float64, non-contiguous parameters), as
        # torch.optim.AdamW would; a backend asked for by name says why it cannot (_check_kernel_tensors).
        backend = _backend.resolve("adamw", self.backend, device, fits=lambda b: b == "torch" or kernels_take)
        if backend != "torch":
            if not kernels_take:
                _check_kernel_tensors(params, backend)
            grads = [g.contiguous() for g in grads]
        has_masters = any(m is not None for m in masters)
        return _GroupWork(params, grads, exp_avgs, exp_avg_sqs, steps, masters if has_masters else None, device, backend)

    # --- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient; returns closure()'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(i, w) for i, g in enumerate(self.param_groups) if (w := self._group_work(g)) is not None]
        if not work:
            return loss
        clip_state = None
        if self.max_grad_norm is not None:
            clip_state = self._clip(work)
        for index, w in work:
            group = self.param_groups[index]
            # Step counts first: the kernels read this step's count. A skipped step adds 0.
            torch._foreach_add_(w.steps, clip_state[1] if clip_state is not None else 1.0)
            beta1, beta2 = group["betas"]
            hyper = dict(
                lr=_lr_for_kernels(group["lr"], w.device), beta1=float(beta1), beta2=float(beta2),
                eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), clip_state=clip_state,
            )
            lists = (w.params, w.grads, w.exp_avgs, w.exp_avg_sqs, w.steps, w.masters)
            if w.backend == "torch":
                reference.adamw_step(*lists, **hyper)
            else:
                cache = self._kernel_caches.setdefault(index, {})
                _backend.kernels("adamw", w.backend).step(*lists, **hyper, cache=cache)
        return loss

    def _clip(self, work: list[tuple[int, _GroupWork]]) -> torch.Tensor:
        """Reduce the global gradient norm on the device; returns clip_state."""
        device = work[0][1].device
        backends = {w.backend for _, w in work}
        backend = backends.pop() if len(backends) == 1 else "torch"  # groups on two backends: torch's norm reads all
        if self._clip_state is None or self._clip_state.device != device:
            self._grad_norm = torch.full((), math.nan, dtype=torch.float32, device=device)
            self._clip_state = torch.ones(2, dtype=torch.float32, device=device)
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        grads = [g for _, w in work for g in w.grads]
        if backend == "torch":
            reference.adamw_grad_norm(grads, self.max_grad_norm, self._grad_norm, self._clip_state, self._skipped)
        else:
            cache = self._kernel_caches.setdefault(-1, {})
            _backend.kernels("adamw", backend).grad_norm(
                grads, self.max_grad_norm, self._grad_norm, self._clip_state, self._skipped, cache=cache
            )
        return self._clip_state


def _check_hyperparameters(group: dict, where: str) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if not lr.is_floating_point():
            raise TypeError(f"{where}a tensor lr must have a floating dtype; got {lr.dtype}")
        if lr.numel() != 1:  # one value: a 0-d tensor, or (1,) as torch.optim.AdamW takes too
            raise ValueError(f"{where}a tensor lr must hold one value (a 0-d tensor); got shape {tuple(lr.shape)}")
        if lr.device.type != "meta" and not 0 <= lr.item() < math.inf:
            raise ValueError(f"{where}lr must be >= 0 and finite, got {lr.item()}")
    else:
        _check_nonnegative(f"{where}lr", lr)
    _check_nonnegative(f"{where}eps", group["eps"])
    _check_nonnegative(f"{where}weight_decay", group["weight_decay"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    for name, beta in zip(("beta1", "beta2"), betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"{where}{name} must be a float, got {type(beta).__name__}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}{name} must be in [0, 1), got {beta}")


def _check_nonnegative(name: str, value: object) -> None:
    # numbers.Real, not (int, float): a NumPy scalar (np.float32, a config read with NumPy) is a float too,
    # as torch.optim.AdamW takes it
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    # inf would step every parameter to inf or NaN (lr, weight_decay) or stop every update (eps)
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")


def _lr_for_kernels(lr: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
    """A float, or a 0-d fp32 tensor on the parameters' device that the kernels read there.

    A CPU tensor (what a user or a scheduler usually holds) is read on the host: that costs
    no GPU sync. A GPU tensor stays on the GPU, so a captured graph follows its updates."""
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    if lr.device.type == "cpu":
        return float(lr.item())
    if lr.device != device:
        raise ValueError(f"a tensor lr must be on the CPU or on the parameters' device {device}; got {lr.device}")
    if lr.dtype != torch.float32:
        # A converted copy would get a new address every step, which a captured graph misses.
        raise TypeError(f"a tensor lr on the GPU must be float32 (the kernels read it there); got {lr.dtype}")
    return lr


def _check_kernel_tensors(params: list[torch.Tensor], backend: str) -> None:
    for p in params:
        if p.dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend {backend!r} updates float32, float16 and bfloat16 parameters; got {p.dtype} (use backend='torch')")
        if not p.is_contiguous():
            raise ValueError(f"backend {backend!r} needs contiguous parameters; got strides {tuple(p.stride())} (use backend='torch')")
