"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

A checkpoint is a folder `<run>/checkpoints/step_<NNNNNNN>/` holding
    model.safetensors   the model's weights (tied weights stored once; meta.json names the aliases)
    state.safetensors   the optimizer's tensors ("optimizer.<i>.<name>") and each rank's RNG states
                        ("rng.rank<r>.torch", "rng.rank<r>.numpy", "rng.rank<r>.cuda.<device>")
    meta.json           format, step, configs, the optimizer's other values and param groups,
                        each rank's numpy/python RNG states, loader position, trainer counters, and the
                        sha256 of both tensor files (checked on loading: a damaged file is an error)
Checkpoints written before the per-rank RNG states hold one process's states, unranked ("rng.torch",
"rng.cuda.<device>", "rng.numpy"); they still load, and every rank restores those.
When meta's "tokenizer" names a tokenizer file, the run folder keeps a copy of it beside checkpoints/
(`<run>/tokenizer.tiktoken` and its sidecar when it has one; a Hugging Face tokenizer.json as
`<run>/tokenizer.json`, with the tokenizer_config.json beside it when it has one) and meta.json the copy's sha256, so that a
run folder moved to another place or machine loads with its own tokenizer, and a tokenizer file
retrained since is noticed.
It is written under a temporary name and renamed into place, so a checkpoint folder either is
complete or does not exist. Loading reads only safetensors and JSON; a rank that gets the weights and the
optimizer's state from rank 0 (FSDP2) reads meta.json and its own RNG states alone (load_checkpoint_without_weights).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._atomic import file_sha256, fsync_dir

FORMAT = "llmkern-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
# A complete checkpoint moved aside while the same step is saved again (save_checkpoint's swap)
_SWAPPED_OUT_DIR = re.compile(r"^step_(\d+)\.old_\d+$")
# A run's checkpoints folder renamed aside to be deleted (discard_checkpoints): never read
_DISCARDED_PREFIX = ".checkpoints_discarded_"
TOKENIZER_FILE = "tokenizer.tiktoken"
HF_TOKENIZER_FILE = "tokenizer.json"
# meta.json's "sha256" holds their hashes: safetensors checks its header and sizes, not the bytes of the tensors,
# so a bit flipped on disk (or a file copied over from another checkpoint of the same model) loaded silently
TENSOR_FILES = ("model.safetensors", "state.safetensors")


@dataclass
class Checkpoint:
    path: str
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # a torch.optim state_dict
    meta: dict[str, Any]  # everything saved as JSON (configs, loader, counters, ...)
    rng: dict[str, Any]  # pass to restore_rng_states


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir(run_dir: str, step: int) -> str:
    """The folder of checkpoint `step` of a run."""
    return os.path.join(checkpoints_dir(run_dir), f"step_{step:07d}")


def step_dirs(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found, swapped_out = {}, {}
    for name in os.listdir(root):
        if m := _STEP_DIR.match(name):
            found[int(m.group(1))] = os.path.join(root, name)
        elif m := _SWAPPED_OUT_DIR.match(name):
            swapped_out[int(m.group(1))] = os.path.join(root, name)
    # A writer killed between its two renames left the step's complete old copy aside and none in
    # place: that copy is the checkpoint (with keep=1 it is the only one; it must not be lost).
    for step, path in swapped_out.items():
        found.setdefault(step, path)
    return sorted(found.items())


def latest_checkpoint(run_dir: str) -> str | None:
    dirs = step_dirs(run_dir)
    return dirs[-1][1] if dirs else None


# --- saving ---------------------------------------------------------------------------------

def save_checkpoint(run_dir: str, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2,
                    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None) -> str:
    """Write checkpoint `step` of a run atomically and delete all but the newest `keep`; its path.
    Checkpoints of later steps (an earlier run's, in a reused run folder) are deleted too.

    rng: every rank's RNG states from gather_rng_states() (which every rank must call; only the
    writer calls this). None: this process's states alone, as rank 0 of one."""
    # keep=0 kept every checkpoint (a [:-0] slice is empty) and a negative step named a folder that
    # step_dirs never finds: refused, as is a bool, which f"{True:07d}" would take for step 1
    for name, value, least in (("step", step, 0), ("keep", keep, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    root = checkpoints_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    final = step_dir(run_dir, step)
    tmp = os.path.join(root, f".tmp_step_{step:07d}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    weights, aliases = _dedupe_shared(model_state)
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    state_tensors, optimizer_meta = _flatten_optimizer(optimizer_state)
    rng_tensors, rng_meta = rng if rng is not None else ranked_rng_states([capture_rng_states()])
    save_file({**state_tensors, **rng_tensors}, os.path.join(tmp, "state.safetensors"))
    full_meta = {"format": FORMAT, "version": VERSION, "step": step, "aliases": aliases,
                 "optimizer": optimizer_meta, "rng": rng_meta, **meta,
                 "sha256": {name: file_sha256(os.path.join(tmp, name)) for name in TENSOR_FILES}}
    tokenizer_hash = _keep_tokenizer_copy(meta.get("tokenizer"), run_dir)  # before the checkpoint that needs it
    if tokenizer_hash is not None:
        full_meta["tokenizer_sha256"] = tokenizer_hash
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(full_meta, f, indent=1)
    for name in os.listdir(tmp):
        _fsync(os.path.join(tmp, name))
    fsync_dir(tmp)  # the files' names too: else a power loss could leave the renamed folder without one of them

    if os.path.exists(final):  # the same step saved again (e.g. the final save): swap it out
        old = final + f".old_{os.getpid()}"
        # a writer of the same pid (a container's entrypoint), killed while deleting its swapped-out copy, left it
        # there: the rename onto it would fail; step `final` is in place whole, so the leftover is not needed
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_dir(root)  # the new checkpoint durable before any older one is deleted below
    prune_checkpoints(run_dir, step, keep)
    return final


def prune_checkpoints(run_dir: str, step: int, keep: int) -> None:
    """What a save does once checkpoint `step` is in place: clear what crashed writers left and delete all
    but the newest `keep` checkpoints, and any past `step`. A resume of a finished run calls it too: its
    final save may have been killed before it got here."""
    root = checkpoints_dir(run_dir)
    # A run's steps only go up, so checkpoints past this step were left by an earlier run in the same
    # folder (a fresh start there): they would be taken for the newest on resume, and the rotation
    # below would delete this one in their favour. They go first.
    for saved_step, path in step_dirs(run_dir):
        if saved_step > step:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):  # half-written or swapped-out folders of a writer that crashed
        path = os.path.join(root, name)
        if name.startswith(".tmp_step_"):
            shutil.rmtree(path, ignore_errors=True)
        elif m := _SWAPPED_OUT_DIR.match(name):
            swapped_step = int(m.group(1))
            if swapped_step > step:  # an earlier run's, as above
                shutil.rmtree(path, ignore_errors=True)
            else:
                _settle_swapped_out(path, step_dir(run_dir, swapped_step))
    for _, path in step_dirs(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _settle_swapped_out(path: str, in_place: str) -> None:
    """A swapped-out copy goes when its step has a checkpoint in place; else it is that step's checkpoint
    (step_dirs counts it so) and is renamed into place, to be kept or rotated like any other."""
    if os.path.exists(in_place):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.rename(path, in_place)


def discard_checkpoints(run_dir: str) -> None:
    """Delete a run's checkpoints (a fresh start replacing the run). They are renamed aside in one step
    first, so a crash while deleting leaves no checkpoint behind rather than a partly deleted one that a
    resume would take for the newest; a folder set aside by an earlier crash goes too."""
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else ():
        if name.startswith(_DISCARDED_PREFIX):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    root = checkpoints_dir(run_dir)
    if not os.path.exists(root):
        return
    aside = os.path.join(run_dir, f"{_DISCARDED_PREFIX}{os.getpid()}")
    os.rename(root, aside)
    fsync_dir(run_dir)  # gone for good before the caller deletes what went with them (the log)
    shutil.rmtree(aside, ignore_errors=True)


def tokenizer_copy_path(run_dir: str, spec: str) -> str:
    """Where a run folder keeps its copy of the tokenizer file `spec` names: a file of the same kind, so that
    the copy loads as the original does (its sidecar or tokenizer_config.json goes beside it)."""
    from ..data.tokenizer import is_hf_tokenizer_json

    return os.path.join(run_dir, HF_TOKENIZER_FILE if is_hf_tokenizer_json(spec) else TOKENIZER_FILE)


def _keep_tokenizer_copy(spec: Any, run_dir: str) -> str | None:
    """Copy the tokenizer file `spec` names (and its sidecar) to the run folder, unless it holds it
    already; its hash. None when spec is "bytes" or an encoding name: nothing to carry. A file gone
    since the data was tokenized never stops a save: the copy an earlier save made stands, or none."""
    from ..data.tokenizer import deciding_files, is_file_spec, tokenizer_file_sha256

    if not (isinstance(spec, str) and spec and is_file_spec(spec)):
        return None
    copy = tokenizer_copy_path(run_dir, spec)
    wanted = tokenizer_file_sha256(spec)
    if wanted is None:
        kept = tokenizer_file_sha256(copy)
        if kept is None:
            warnings.warn(f"the tokenizer file {spec!r} is gone: the checkpoint is saved without a copy of it, and "
                          f"the run's text cannot be encoded or decoded until it is back", stacklevel=3)
        return kept
    if tokenizer_file_sha256(copy) != wanted:
        pending = []  # both files under temporary names first, then renamed into place
        for source, target in zip(deciding_files(spec), deciding_files(copy)):
            if os.path.isfile(source):
                tmp = f"{target}.tmp_{os.getpid()}"
                shutil.copyfile(source, tmp)
                _fsync(tmp)
                pending.append((tmp, target))
            elif os.path.exists(target):
                os.remove(target)  # the new tokenizer has no sidecar (or config): an old one would change it
        for tmp, target in pending:
            os.replace(tmp, target)
    return wanted


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU copies, each shared tensor (tied embeddings) once; {alias: stored name}."""
    stored: dict[tuple, str] = {}
    weights, aliases = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.device.type != "meta" else None
        if key is not None and key in stored and t.numel() > 0:
            aliases[name] = stored[key]
            continue
        stored[key] = name
        weights[name] = t.detach().to("cpu").contiguous()
    return weights, aliases


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch.optim state_dict -> tensors "optimizer.<i>.<name>" + JSON (keys, non-tensor values, groups)."""
    tensors, scalars = {}, {}
    keys = list(state.get("state", {}).keys())
    for i, key in enumerate(keys):
        for name, value in state["state"][key].items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{i}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{i}.{name}"] = value
    return tensors, {"keys": keys, "scalars": scalars, "param_groups": state.get("param_groups", [])}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {key: {} for key in meta["keys"]}
    keys = meta["keys"]
    for flat, value in tensors.items():
        if flat.startswith("optimizer."):
            i, name = flat[len("optimizer."):].split(".", 1)
            state[keys[int(i)]][name] = value
    for flat, value in meta["scalars"].items():
        i, name = flat.split(".", 1)
        state[keys[int(i)]][name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# --- RNG states -----------------------------------------------------------------------------
# Each process of a torchrun job has its own generators, and they may differ (dropout masks, anything
# random per rank), so a checkpoint keeps every rank's states and each rank restores its own.

def capture_rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states, unranked: tensors "rng.torch", "rng.cuda.<device>" (every visible GPU),
    "rng.numpy", and the numpy/python values JSON holds."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss_next = random.getstate()
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(py_state), gauss_next]}


def gather_rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every rank's RNG states (ranked_rng_states), on every rank; in one process, its own as rank 0.
    A collective under torch.distributed: every rank must call it, or the ones that did wait forever."""
    local = capture_rng_states()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ranked_rng_states([local])
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local)  # small CPU tensors and lists: fine on gloo and nccl
    return ranked_rng_states(per_rank)


def ranked_rng_states(per_rank: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """capture_rng_states() of ranks 0, 1, ... -> the checkpoint's layout: tensors "rng.rank<r>.<name>",
    JSON {"ranks": [rank 0's numpy/python values, rank 1's, ...]}."""
    tensors = {}
    for rank, (rank_tensors, _) in enumerate(per_rank):
        for key, value in rank_tensors.items():
            tensors[f"rng.rank{rank}.{key[len('rng.'):]}"] = value
    return tensors, {"ranks": [rank_meta for _, rank_meta in per_rank]}


def restore_rng_states(rng: dict[str, Any], rank: int | None = None, world_size: int | None = None) -> None:
    """Set this process's generators to its rank's states in a checkpoint's `rng` (Checkpoint.rng).

    rank and world_size default to the torch.distributed process group's (0 and 1 without one). A
    checkpoint saved with another number of processes: a rank it has restores its own states, any
    other rank rank 0's, and rank 0 warns (once) that the run will not continue exactly as it would
    have. A checkpoint from before the per-rank states holds one process's: every rank restores those
    (rank 0 warns when there are several)."""
    grouped = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if grouped else 0
    if world_size is None:
        world_size = dist.get_world_size() if grouped else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    tensors, meta = _states_of_rank(rng, rank, world_size)
    _restore_process_states(tensors, meta)


def _states_of_rank(rng: dict[str, Any], rank: int, world_size: int
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The unranked (tensors, meta) that `rank` restores; the warnings of restore_rng_states."""
    tensors, meta = rng["tensors"], rng["meta"]
    if "ranks" not in meta:  # the old layout: one process's states, unranked
        if rank == 0 and world_size > 1:
            warnings.warn(f"the checkpoint holds one process's RNG states (saved before per-rank states): all "
                          f"{world_size} ranks restore them, so random draws that differed between the ranks "
                          f"will not continue as they would have", stacklevel=3)
        return tensors, meta
    saved = len(meta["ranks"])
    if rank == 0 and saved != world_size:
        warnings.warn(f"the checkpoint holds the RNG states of {saved} processes, this run has {world_size}: "
                      f"ranks without their own take rank 0's, so random draws will not continue exactly as "
                      f"they would have", stacklevel=3)
    source = _rank_restored_by(rank, saved)
    prefix = _rank_prefix(source)
    own = {"rng." + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if "rng.torch" not in own or "rng.numpy" not in own:
        raise ValueError(f"the checkpoint's RNG states of rank {source} are incomplete (it has {sorted(own)})")
    return own, meta["ranks"][source]


def _rank_restored_by(rank: int, saved: int) -> int:
    """The rank whose saved RNG states `rank` restores, of a checkpoint that holds `saved` ranks' states: its
    own, or rank 0's when it has none."""
    return rank if rank < saved else 0


def _rank_prefix(rank: int) -> str:
    """The prefix of rank `rank`'s RNG tensors in state.safetensors; the dot keeps rank 1's apart from rank 10's."""
    return f"rng.rank{rank}."


def _restore_process_states(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Set this process's generators from capture_rng_states()'s layout."""
    torch.set_rng_state(tensors["rng.torch"])
    # in device order: sorted by the number, as a string sort puts rng.cuda.10 before rng.cuda.2
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss_next = meta["python"]
    random.setstate((version, tuple(py_state), gauss_next))


# --- loading --------------------------------------------------------------------------------

def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint folder (or a run folder: its latest checkpoint). Clear errors when it is
    missing or damaged; only safetensors and JSON are read, nothing is unpickled."""
    weights = load_model_checkpoint(path)
    state = _read_tensors(weights.path, "state.safetensors", weights.meta)
    optimizer = _unflatten_optimizer(state, weights.meta["optimizer"])
    rng = {"tensors": {k: v for k, v in state.items() if k.startswith("rng.")}, "meta": weights.meta["rng"]}
    return dataclasses.replace(weights, optimizer=optimizer, rng=rng)


def load_model_checkpoint(path: str) -> Checkpoint:
    """load_checkpoint without the optimizer state and RNG states (`optimizer` and `rng` are {}): its meta.json and
    weights, what generation, evaluation, export and a fine-tuning's start need. state.safetensors, AdamW's two
    fp32 moments (8 bytes a parameter, twice a bf16 model's weights and more), is not read."""
    path = _checkpoint_folder(path)
    meta = _read_checkpoint_meta(path)
    model = _read_tensors(path, "model.safetensors", meta)
    for alias, name in meta["aliases"].items():
        if name not in model:
            raise ValueError(f"checkpoint {path!r} is damaged: alias {alias!r} points to missing {name!r}")
        model[alias] = model[name]
    return Checkpoint(path=path, step=int(meta["step"]), model=model, optimizer={}, meta=meta, rng={})


def load_checkpoint_without_weights(path: str, rank: int) -> Checkpoint:
    """A checkpoint folder (or a run folder: its latest checkpoint) without its weights and optimizer state
    (`model` and `optimizer` are {}): its meta.json and the RNG states that rank `rank` restores
    (restore_rng_states: its own, or rank 0's when the checkpoint has none of its own; every "rng." tensor of
    a checkpoint from before the per-rank states).

    What a rank other than 0 reads under FSDP2, where rank 0 alone reads the whole checkpoint (load_checkpoint:
    ~12 bytes a parameter, 84 GB for a 7B model) and broadcasts it (distributed.load_full_state_dicts): the
    RNG tensors are read alone from state.safetensors (its header, then their few bytes), never the others.
    The files' sha256 are not checked here: hashing reads a file whole (state.safetensors is most of the
    checkpoint), on every rank at once, and rank 0's load_checkpoint of the same folder checks them, which the
    caller makes every rank's error (distributed.load_checkpoint_for)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    path = _checkpoint_folder(path)
    meta = _read_checkpoint_meta(path)
    rng = {"tensors": _read_rng_tensors_of_rank(path, meta["rng"], rank), "meta": meta["rng"]}
    return Checkpoint(path=path, step=int(meta["step"]), model={}, optimizer={}, meta=meta, rng=rng)


def _checkpoint_folder(path: str) -> str:
    """The checkpoint folder `path` names: itself, or a run folder's latest checkpoint."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "meta.json")) and not _STEP_DIR.match(
            os.path.basename(os.path.normpath(path))):
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {path!r} (no {checkpoints_dir(path)}/step_* folder)")
        path = latest
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return path


def _read_checkpoint_meta(path: str) -> dict[str, Any]:
    """meta.json of checkpoint folder `path`, checked, its tokenizer the one to load the checkpoint with."""
    meta = _read_meta(path)
    if "tokenizer" in meta:
        meta["tokenizer"] = _tokenizer_to_load(meta, path)
    return meta


def _read_rng_tensors_of_rank(path: str, rng_meta: dict[str, Any], rank: int) -> dict[str, torch.Tensor]:
    """The RNG tensors of state.safetensors that rank `rank` restores, read alone (safe_open reads a tensor's
    bytes when asked for it, and only those)."""
    name = "state.safetensors"
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint {path!r} is incomplete: {name} is missing")
    ranks = rng_meta.get("ranks")
    if ranks is None:  # the old layout: one process's states, unranked, which every rank restores
        prefix = "rng."
    elif isinstance(ranks, list):
        prefix = _rank_prefix(_rank_restored_by(rank, len(ranks)))
    else:
        raise ValueError(f"checkpoint {path!r} is damaged: meta.json's rng 'ranks' is not a JSON array ({ranks!r:.80})")
    try:
        with safe_open(file, framework="pt") as f:  # it has keys(), but cannot be iterated itself
            return {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path!r} is damaged: cannot read {name} ({e})") from e


def _tokenizer_to_load(meta: dict[str, Any], path: str) -> Any:
    """The tokenizer spec to load checkpoint `path` with: the recorded one while that file still holds
    what the checkpoint was saved with (so data tokenized with it still matches by name), else the run
    folder's copy (the file was moved, deleted or retrained since, or the run came from elsewhere)."""
    from ..data.tokenizer import tokenizer_file_sha256

    spec, wanted = meta.get("tokenizer"), meta.get("tokenizer_sha256")
    if wanted is None or not isinstance(spec, str):
        return spec  # "bytes", an encoding name, or a checkpoint from before the copies
    if tokenizer_file_sha256(spec) == wanted:
        return spec
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # <run>/checkpoints/step_N
    copy = tokenizer_copy_path(run_dir, spec)
    if tokenizer_file_sha256(copy) == wanted:
        return copy
    warnings.warn(f"checkpoint {path!r} was saved with the tokenizer file {spec!r}, which has changed or gone "
                  f"since, and its run folder holds no copy of it ({copy!r} is missing or another "
                  f"tokenizer): text will not be tokenized as in training", stacklevel=3)
    return spec


def _read_meta(path: str) -> dict[str, Any]:
    file = os.path.join(path, "meta.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint {path!r} is incomplete: meta.json is missing")
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path!r} is damaged: meta.json is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not an llmkern checkpoint (format is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{file} has checkpoint version {meta.get('version')!r}; this llmkern reads {VERSION}")
    for key, kind in (("step", int), ("aliases", dict), ("optimizer", dict), ("rng", dict), ("sha256", dict)):
        if key not in meta and key != "sha256":  # no hashes: saved before they were recorded
            raise ValueError(f"checkpoint {path!r} is damaged: meta.json lacks {key!r}")
        if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], kind)):
            raise ValueError(f"checkpoint {path!r} is damaged: meta.json's {key!r} is not a JSON "
                             f"{'integer' if kind is int else 'object'} ({meta[key]!r:.80})")
    return meta


def _read_tensors(path: str, name: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of file `name`, the file checked against the sha256 meta.json recorded (checkpoints saved
    before the hashes have none: they load unchecked)."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint {path!r} is incomplete: {name} is missing")
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path!r} is damaged: cannot read {name} ({e})") from e
    recorded = meta.get("sha256", {}).get(name)
    if recorded is None:
        return tensors
    # Hashed after the load (streamed: the tensors are not read into memory twice), so the file may have gone
    # in between (a save pruning the folder): the same error as a file missing before
    try:
        digest = file_sha256(file)
    except OSError as e:
        raise ValueError(f"checkpoint {path!r} is damaged: cannot read {name} ({e})") from e
    if digest != recorded:
        raise ValueError(f"checkpoint {path!r} is damaged: {name} differs from the file it was saved with (its "
                         f"sha256 is not the one meta.json recorded)")
    return tensors
