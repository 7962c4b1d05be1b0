"""Muon for the hidden matrices beside llmkern's AdamW (llmkern.optim.muon), and optimizer="muon" in the trainer."""

import copy
import math
import os
import shutil

import pytest
import torch
from test_train import TINY_MODEL, data_dir, tiny_config, train_losses  # noqa: F401 (data_dir: a fixture)
from torch import nn

from llmkern.model import GPT, GPTConfig
from llmkern.optim import AdamW, Muon, MuonParameter, MuonWithAdamW, muon_parameters
from llmkern.optim import muon as muon_module
from llmkern.optim.muon import split_groups
from llmkern.train import TrainConfig, Trainer
from llmkern.train import checkpoint as ckpt


def tiny_model(preset, seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset(preset, vocab_size=61, n_layer=2, n_embd=32, block_size=16, **overrides))


def random_gradients(model_or_params, seed):
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def random_matrices(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def clones(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


@pytest.mark.parametrize("preset, overrides, expected", [
    ("tiny", {}, [("attn.qkv.weight", (32, 32, 32)), ("attn.proj.weight", (32,)),  # GPT-2: biases to AdamW
                  ("mlp.fc.weight", (128,)), ("mlp.proj.weight", (32,))]),
    # GQA, heads of head_dim 8 (not n_embd / n_head): the blocks are the module's, not a guess from the shape
    ("tiny-llama", {"n_kv_head": 1, "head_dim": 8}, [
        ("attn.qkv.weight", (16, 8, 8)), ("attn.proj.weight", (32,)), ("mlp.gate_up.weight", (128, 128)),
        ("mlp.proj.weight", (32,))]),
    # the stacked (E, rows, cols) experts: each expert's gate_up as gate and up, its proj whole
    ("tiny-moe", {}, [("attn.qkv.weight", (32, 16, 16)), ("attn.proj.weight", (32,)), ("mlp.gate_up", (128, 128)),
                      ("mlp.proj", (32,)), ("mlp.router.weight", (4,))]),
])
def test_muon_parameters_are_the_blocks_matrices_each_with_its_projections(preset, overrides, expected):
    model = tiny_model(preset, **overrides)
    chosen = muon_parameters(model)
    assert [(entry.name, entry.row_blocks) for entry in chosen] == [
        (f"blocks.{i}.{name}", blocks) for i in range(2) for name, blocks in expected]
    names = dict(model.named_parameters())
    assert all(entry.param is names[entry.name] for entry in chosen)
    # every other parameter goes to AdamW, once, in the model's groups (decay on matrices, none on vectors)
    groups = split_groups(model.optimizer_groups(0.1), chosen)
    rest = [p for g in groups for p in g["params"]]
    matrices = [entry.param for entry in chosen]
    assert len({id(p) for p in rest + matrices}) == len(rest) + len(matrices) == len(list(model.parameters()))
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in groups[0]["params"]} >= {"wte.weight"} and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_a_step_of_plain_matrices_equals_torch_muons(adjust_lr_fn, nesterov):
    # tall, wide and square; two of one shape share a batched Newton-Schulz stack
    ours = random_matrices([(48, 17), (17, 48), (33, 33), (48, 17)], seed=0)
    theirs = clones(ours)
    settings = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "nesterov": nesterov, "adjust_lr_fn": adjust_lr_fn}
    muon, reference = Muon(ours, **settings), torch.optim.Muon(theirs, **settings)
    for step in range(4):  # momentum carried over steps; the lr halved at the third
        random_gradients(ours, step)
        random_gradients(theirs, step)
        if step == 2:
            for group in muon.param_groups + reference.param_groups:
                group["lr"] /= 2
        muon.step()
        reference.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)  # bitwise on the CPU: the same bfloat16 products, batched
        assert torch.equal(muon.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])


def block_views(tensor, row_blocks):
    """tensor's row blocks, each expert's in turn for a 3-D stack: the matrices Muon steps apart."""
    matrices = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor
    return [block for matrix in matrices for block in matrix.split(row_blocks)]


def steps_of_both(fused, steps=3):
    """Our Muon over the fused parameters (MuonParameters), torch's over each of their blocks as a parameter of its
    own, the same gradients: after each step, every block of ours equals torch's."""
    separate = [clones(block_views(entry.param, entry.row_blocks)) for entry in fused]
    settings = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "adjust_lr_fn": "match_rms_adamw"}
    muon = Muon(fused, **settings)
    reference = torch.optim.Muon([p for blocks in separate for p in blocks], **settings)
    for step in range(steps):
        random_gradients([entry.param for entry in fused], step)
        for entry, blocks in zip(fused, separate):
            for block, grad in zip(blocks, block_views(entry.param.grad, entry.row_blocks)):
                block.grad = grad.clone()
        muon.step()
        reference.step()
        for entry, blocks in zip(fused, separate):
            assert all(torch.equal(ours, theirs) for ours, theirs in zip(block_views(entry.param, entry.row_blocks),
                                                                         blocks)), (entry.name, step)


def test_a_fused_matrix_steps_as_its_projections_apart():
    # GQA attention's qkv (q: 4 heads of 8, k and v: 1 head each) and a SwiGLU gate_up (gate, up: 40 rows each)
    qkv, gate_up = random_matrices([(48, 24), (80, 24)], seed=1)
    whole = clones([qkv, gate_up])
    steps_of_both([MuonParameter("qkv", qkv, (32, 8, 8)), MuonParameter("gate_up", gate_up, (40, 40))])
    # the test can fail: orthogonalized whole (torch's Muon, llmkern's before), the fused matrices step otherwise
    wholly = torch.optim.Muon(whole, lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        random_gradients(whole, step)
        wholly.step()
    assert not any(torch.allclose(p, q, atol=1e-4) for p, q in zip(whole, (qkv, gate_up)))


# by default the 3 experts' gate and up blocks (40 x 24) are one stack of 6; under 2000 elements a stack holds 2
# of them (a block's 3 experts cut 2 | 1), under 1000 one: a big model's expert stack of one block is cut too
@pytest.mark.parametrize("max_stack", [None, 2000, 1000])
def test_each_expert_steps_as_a_matrix_of_its_own(monkeypatch, max_stack):
    stack_sizes = []

    def recording(stack, *args):
        stack_sizes.append(stack.numel())
        return newton_schulz(stack, *args)

    newton_schulz = muon_module.newton_schulz
    monkeypatch.setattr(muon_module, "newton_schulz", recording)
    if max_stack is not None:
        monkeypatch.setattr(muon_module, "_MAX_STACK_ELEMENTS", max_stack)
    # 3 experts: gate_up (E, 2 * 40, 24), [gate | up] fused in each, and proj (E, 24, 40)
    gate_up, proj = random_matrices([(3, 80, 24), (3, 24, 40)], seed=2)
    steps_of_both([MuonParameter("gate_up", gate_up, (40, 40)), MuonParameter("proj", proj, (24,))])
    assert max(stack_sizes) == (6 * 960 if max_stack is None else max_stack // 960 * 960), stack_sizes
    # a plain 3-D tensor is one block per matrix of the stack
    plain = Muon([proj])
    assert plain.param_groups[0]["row_blocks"] == ((24,),)


@pytest.mark.parametrize("row_blocks, message", [
    ((32, 8), "row_blocks must be positive ints summing to the parameter's 48 rows, got"),
    ((48, 0), "row_blocks must be positive ints"),
])
def test_row_blocks_that_do_not_split_the_rows_are_refused(row_blocks, message):
    (qkv,) = random_matrices([(48, 24)], seed=0)
    with pytest.raises(ValueError, match=message):
        Muon([MuonParameter("qkv", qkv, row_blocks)])
    with pytest.raises(ValueError, match=r"matrices \(2-D\) and stacks of them \(3-D\), got .* shape \(24,\)"):
        Muon([nn.Parameter(torch.zeros(24))])


# global shapes and row blocks, split by rows (a stack: by matrix) as FSDP2 shards them, over 2 processes: 24 | 24
# rows of a qkv cut inside q; 13 | 12 rows of an odd 25 cut inside q; 2 | 1 rows; 1 | none; 2 | 1 experts of 3.
# Over 3: 16 | 16 | 16 rows of the qkv, the last two cut at k; 9 | 9 | 7; 1 | 1 | 1; 1 | none | none; 2 | 2 | none
SHARDED_SHAPES = [((48, 24), (32, 8, 8)), ((25, 12), (15, 5, 5)), ((3, 24), (3,)), ((1, 24), (1,)),
                  ((3, 80, 24), (40, 40)), ((3, 24, 40), (24,)), ((4, 24), (4,))]


def _dtensor_step_worker(rank, world, port, out_dir):
    """Each of `world` processes: 3 Muon steps of the SHARDED_SHAPES parameters as DTensors sharded on dim 0, and
    of the same whole tensors plain, in two param groups (the second of one parameter: the other processes own
    none of it); writes out_dir/rank<rank>.json: which parameters or momentum buffers differ (gathered whole),
    and the errors of parameters sharded otherwise. Checked by the parent (an assert here would leave the other
    processes waiting at a collective)."""
    import json

    import spawned
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    plain = random_matrices([shape for shape, _ in SHARDED_SHAPES], seed=3)  # the same on every process
    sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
    settings = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "adjust_lr_fn": "match_rms_adamw"}

    def two_groups(params):
        entries = [MuonParameter(str(i), p, blocks) for i, (p, (_, blocks)) in enumerate(zip(params, SHARDED_SHAPES))]
        return [{"params": entries[:-1]}, {"params": entries[-1:], "lr": 0.03}]

    muon, reference = Muon(two_groups(sharded), **settings), Muon(two_groups(plain), **settings)
    for step in range(3):
        random_gradients(plain, step)
        for p, q in zip(sharded, plain):
            p.grad = distribute_tensor(q.grad.clone(), mesh, [Shard(0)])
        muon.step()
        reference.step()
    first = random_matrices([shape for shape, _ in SHARDED_SHAPES], seed=3)
    report = {"params": [i for i, (p, q) in enumerate(zip(sharded, plain)) if not torch.equal(p.full_tensor(), q)],
              "buffers": [i for i, (p, q) in enumerate(zip(sharded, plain))
                          if not torch.equal(muon.state[p]["momentum_buffer"].full_tensor(),
                                             reference.state[q]["momentum_buffer"])],
              "unmoved": [i for i, (p, q) in enumerate(zip(plain, first)) if torch.equal(p, q)],
              "refused": []}
    for placement in (Shard(1), Replicate()):
        try:
            Muon([nn.Parameter(distribute_tensor(torch.zeros(4, 6), mesh, [placement]))])
        except ValueError as err:
            report["refused"].append(str(err))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    spawned.leave()


@pytest.mark.parametrize("world", [2, 3])
def test_a_step_of_fsdp_shards_equals_the_step_of_the_whole_matrices(tmp_path, world):
    # Under FSDP2 a process holds a dim-0 slice of each parameter (uneven: torch.chunk's split). Each parameter's
    # owner gathers its whole update and orthogonalizes it, and sends each process its rows back: every slice
    # steps as one process steps the whole parameter, bitwise (the same bfloat16 products), wherever the slices
    # cut the projections
    import json

    import spawned
    import torch.multiprocessing as mp

    mp.start_processes(_dtensor_step_worker, args=(world, spawned.free_port(), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["params"] == [] and report["buffers"] == [] and report["unmoved"] == [], (rank, report)
        assert len(report["refused"]) == 2 and all("sharded on dim 0 over a 1-D device mesh" in message
                                                   for message in report["refused"]), report["refused"]
        assert "Shard(dim=1)" in report["refused"][0] and "Replicate()" in report["refused"][1]


def test_the_matrices_are_shared_out_largest_first_to_the_least_loaded_process():
    # 40 to 0, 30 to 1, 20 to 1 (30 < 40), 10 to 0 (40 < 50), 5 to 0 (50 = 50: the lower rank): 55 | 50
    assert muon_module._owners([10, 40, 30, 20, 5], world=2) == [0, 0, 1, 1, 0]
    assert muon_module._owners([7], world=3) == [0]  # the other processes own none


def combined_optimizer(model, lr=1e-3, muon_lr=1e-3, weight_decay=0.1, **kwargs):
    chosen = muon_parameters(model)
    return MuonWithAdamW(chosen, split_groups(model.optimizer_groups(weight_decay), chosen), lr=lr, muon_lr=muon_lr,
                         weight_decay=weight_decay, **kwargs)


def test_a_step_equals_llmkern_muon_and_adamw_applied_by_hand():
    model = tiny_model("tiny-moe")
    by_hand = copy.deepcopy(model)
    lr, muon_lr, wd = 3e-3, 6e-3, 0.05
    combined = combined_optimizer(model, lr, muon_lr, wd, momentum=0.9, betas=(0.9, 0.95))
    chosen = muon_parameters(by_hand)
    muon = Muon(chosen, lr=muon_lr, weight_decay=wd, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    adamw = AdamW(split_groups(by_hand.optimizer_groups(wd), chosen), lr=lr, betas=(0.9, 0.95))
    for step in range(3):  # momentum and moments carried over steps; the schedule halves both lrs at the last
        random_gradients(model, step)
        random_gradients(by_hand, step)
        if step == 2:
            for group in combined.param_groups:
                group["lr"] = lr / 2 * group.get("lr_scale", 1.0)
            for group in muon.param_groups + adamw.param_groups:
                group["lr"] /= 2
        combined.step()
        muon.step()
        adamw.step()
        combined.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    moved = 0
    for (name, p), q, first in zip(model.named_parameters(), by_hand.parameters(), tiny_model("tiny-moe").parameters()):
        assert torch.equal(p, q), name
        moved += not torch.equal(p, first)
    assert moved == len(list(model.parameters()))  # every parameter stepped
    experts = {id(entry.param) for entry in muon_parameters(model) if entry.param.dim() == 3}
    assert len(experts) == 4 and all(id(p) not in experts for g in combined.adamw.param_groups for p in g["params"])


def test_the_state_dict_round_trips_and_refuses_another_optimizers():
    model = tiny_model("tiny-llama")
    optimizer = combined_optimizer(model)
    random_gradients(model, 0)
    optimizer.step()
    saved = optimizer.state_dict()
    n_params = len(list(model.parameters()))
    assert sorted(saved["state"]) == list(range(n_params))  # numbered across both parts, as one optimizer's
    assert [sorted(saved["state"][i]) for i in (0, n_params - 1)] == [["momentum_buffer"],
                                                                       ["exp_avg", "exp_avg_sq", "step"]]
    assert saved["param_groups"][0]["row_blocks"] == ((32, 16, 16), (32,), (128, 128), (32,)) * 2  # says the split
    other = copy.deepcopy(model)
    restored = combined_optimizer(other)
    # as read back from a checkpoint's JSON: the row blocks lists
    as_json = {**saved, "param_groups": [{**saved["param_groups"][0], "row_blocks": [
        list(blocks) for blocks in saved["param_groups"][0]["row_blocks"]]}, *saved["param_groups"][1:]]}
    restored.load_state_dict(copy.deepcopy(as_json))  # load_state_dict keeps the tensors it is given
    random_gradients(model, 1)
    random_gradients(other, 1)
    optimizer.step()
    restored.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    plain = AdamW(model.optimizer_groups(0.1), lr=1e-3)
    with pytest.raises(ValueError, match="has 2 param groups, this optimizer 3 .*saved by another optimizer"):
        restored.load_state_dict(plain.state_dict())
    swapped = {**saved, "param_groups": saved["param_groups"][::-1]}
    with pytest.raises(ValueError, match="param group 0 of the state_dict lacks momentum"):
        restored.load_state_dict(swapped)
    split_otherwise = {**saved, "param_groups": [{**saved["param_groups"][0], "row_blocks": (
        (64,), (32,), (128, 128), (32,)) * 2}, *saved["param_groups"][1:]]}
    with pytest.raises(ValueError, match=r"splits its matrices into the row blocks \(\(64,\), .*saved for another"):
        restored.load_state_dict(split_otherwise)


def old_state_dict(model, seed=0):
    """What llmkern's MuonWithAdamW before its own Muon saved after a step: torch.optim.Muon over the blocks' 2-D
    matrices (its group with lr_scale), llmkern's AdamW over the rest, MoE experts included, numbered across both."""
    matrices = [p for p in model.blocks.parameters() if p.dim() == 2]
    muon = torch.optim.Muon([{"params": matrices, "lr_scale": 1.0}], lr=1e-3, weight_decay=0.1,
                            adjust_lr_fn="match_rms_adamw")
    adamw = AdamW(split_groups(model.optimizer_groups(0.1), matrices), lr=1e-3)
    random_gradients(model, seed)
    muon.step()
    adamw.step()
    muon_state, adamw_state = muon.state_dict(), adamw.state_dict()
    offset = len(matrices)
    return {"state": {**muon_state["state"], **{i + offset: v for i, v in adamw_state["state"].items()}},
            "param_groups": muon_state["param_groups"] + [{**g, "params": [i + offset for i in g["params"]]}
                                                          for g in adamw_state["param_groups"]]}


def test_an_old_dense_state_dict_loads_as_the_same_momentum_and_moments():
    old_model, model = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    old = old_state_dict(old_model)  # the same gradients as ours' first step below: the same momentum and moments
    optimizer = combined_optimizer(model)
    random_gradients(model, 0)
    optimizer.step()
    resumed = copy.deepcopy(model)  # our weights (torch's Muon orthogonalized the fused matrices whole)
    from_old = combined_optimizer(resumed)
    from_old.load_state_dict(old)
    assert from_old.param_groups[0]["row_blocks"] == optimizer.param_groups[0]["row_blocks"]
    for name, p, q in zip([n for n, _ in model.named_parameters()], model.parameters(), resumed.parameters()):
        ours, theirs = optimizer_state_of(optimizer, p), optimizer_state_of(from_old, q)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    random_gradients(model, 1)
    random_gradients(resumed, 1)
    optimizer.step()
    from_old.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def optimizer_state_of(optimizer, p):
    return optimizer.muon.state[p] if p in optimizer.muon.state else optimizer.adamw.state[p]


def test_an_old_state_dict_with_experts_in_adamw_is_refused_with_its_cause():
    old = old_state_dict(tiny_model("tiny-moe"))
    model = tiny_model("tiny-moe")
    optimizer = combined_optimizer(model)
    with pytest.raises(ValueError, match=r"saved by an earlier llmkern MuonWithAdamW \(torch.optim.Muon\), which "
                                         r"stepped the MoE experts with AdamW.*--init_from"):
        optimizer.load_state_dict(old)
    assert not optimizer.muon.state and not optimizer.adamw.state  # nothing half-loaded


def _old_state_under_fsdp_worker(rank, port, out_dir):
    """Each of 2 processes: a tiny MoE model sharded by FSDP2 resumes, through the checkpoint code's loader, the old
    optimizer state that rank 0 read; writes out_dir/rank<rank>.txt: the error, or "loaded"."""
    import spawned

    from llmkern.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = tiny_model("tiny-moe")
    saved_model, old = (tiny_model("tiny-moe").state_dict(), old_state_dict(tiny_model("tiny-moe"))) if rank == 0 \
        else ({}, {})
    distributed.wrap(model, distributed.DistInfo(rank=rank, world_size=2), torch.device("cpu"), "fsdp")
    try:
        distributed.load_full_state_dicts(model, combined_optimizer(model), saved_model, old)
        outcome = "loaded"
    except Exception as err:  # noqa: BLE001 (written for the parent to check: an assert here would hang the other)
        outcome = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    spawned.leave()


def test_an_old_state_dict_with_experts_in_adamw_is_refused_under_fsdp_too(tmp_path):
    # FSDP2's loader hands each of MuonWithAdamW's optimizers its part itself: the refusal must come first there too
    # (it failed with "The size of tensor a (256) must match the size of tensor b (2)")
    import spawned
    import torch.multiprocessing as mp

    mp.start_processes(_old_state_under_fsdp_worker, args=(spawned.free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    cause, other = ((tmp_path / f"rank{rank}.txt").read_text() for rank in range(2))
    assert cause.startswith("ValueError: the state_dict was saved by an earlier llmkern MuonWithAdamW"), cause
    assert "failed on rank 0" in other and "rank 1 stops too" in other, other  # rank 0 read it: the others stop


@pytest.mark.parametrize("kwargs, error, message", [
    ({"muon_lr": 0.0}, ValueError, "muon_lr must be > 0"),
    ({"lr": math.nan}, ValueError, "lr must be > 0"),
    ({"muon_lr": True}, TypeError, "muon_lr must be a float, got bool"),
])
def test_bad_learning_rates_are_refused(kwargs, error, message):
    model = tiny_model("tiny")
    settings = {"lr": 1e-3, "muon_lr": 1e-3, "weight_decay": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        MuonWithAdamW(muon_parameters(model), split_groups(model.optimizer_groups(0.1), muon_parameters(model)),
                      **settings)


def test_a_parameter_in_both_parts_is_refused():
    model = tiny_model("tiny")
    with pytest.raises(ValueError, match="in both muon_params and adamw_groups"):
        MuonWithAdamW(muon_parameters(model), model.optimizer_groups(0.1), lr=1e-3, muon_lr=1e-3, weight_decay=0.1)


# --- the trainer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"optimizer": "muon", "muon_lr": -1.0}, "muon_lr must be >= 0 and finite"),
    ({"optimizer": "muon", "muon_lr": math.inf}, "muon_lr must be >= 0 and finite"),
    ({"optimizer": "muon", "muon_momentum": 1.0}, r"muon_momentum must be in \[0, 1\)"),
    ({"optimizer": "adam"}, "optimizer must be one of .*'muon'"),
])
def test_muon_settings_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields).validate()


def test_muon_runs_under_fsdp():
    # refused before Muon gathered the sharded matrices' updates (test_distributed.py trains with it)
    assert TrainConfig(optimizer="muon", parallel="fsdp").validate().parallel == "fsdp"


def test_muon_settings_without_muon_are_warned_about():
    with pytest.warns(UserWarning, match="muon_lr=0.01 has no effect: only optimizer='muon' reads it"):
        TrainConfig(muon_lr=0.01).validate()
    assert TrainConfig(optimizer="muon").effective_muon_lr() == TrainConfig().lr
    assert TrainConfig(optimizer="muon", muon_lr=0.02).effective_muon_lr() == 0.02


def test_a_muon_run_learns_with_the_schedule_scaling_both_parts(tmp_path, data_dir):  # noqa: F811
    config = tiny_config(tmp_path / "run", data_dir, max_steps=12, optimizer="muon", muon_lr=6e-3)
    trainer = Trainer(config)
    assert isinstance(trainer.optimizer, MuonWithAdamW)
    trainer.fit()
    losses = train_losses(tmp_path / "run")
    assert losses[12] < losses[1] - 1.0, losses
    last_lr = config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * 9 / 10))  # step 12's
    muon_group, *adamw_groups = trainer.optimizer.param_groups
    assert muon_group["lr"] == pytest.approx(last_lr * 2) and muon_group["weight_decay"] == config.weight_decay
    assert all(g["lr"] == pytest.approx(last_lr) for g in adamw_groups)


def test_a_muon_run_resumes_bitwise(tmp_path, data_dir):  # noqa: F811
    config = tiny_config(tmp_path / "run", data_dir, preset="tiny-moe", model={**TINY_MODEL, "n_kv_head": 1},
                         max_steps=6, ckpt_interval=3, optimizer="muon")
    Trainer(config).fit()
    uninterrupted = train_losses(tmp_path / "run")
    assert uninterrupted[6] < uninterrupted[1] - 0.3, uninterrupted  # learns with the experts in Muon too
    final = ckpt.load_checkpoint(str(tmp_path / "run"))
    assert any(name.endswith("momentum_buffer") for entry in final.optimizer["state"].values() for name in entry)
    shutil.rmtree(ckpt.step_dir(str(tmp_path / "run"), 6))  # "crashed" after step 3's checkpoint
    Trainer(config).fit(resume=True)
    assert train_losses(tmp_path / "run") == uninterrupted  # exact floats
    again = ckpt.load_checkpoint(str(tmp_path / "run"))
    for name, tensor in final.model.items():
        assert torch.equal(again.model[name], tensor), name
    for key, entry in final.optimizer["state"].items():
        for name, value in entry.items():
            assert torch.equal(again.optimizer["state"][key][name], value), (key, name)


def test_resuming_an_adamw_run_with_muon_is_a_clear_error(tmp_path, data_dir):  # noqa: F811
    Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=4, ckpt_interval=2)).fit()
    shutil.rmtree(ckpt.step_dir(str(tmp_path / "run"), 4))
    with pytest.raises(ValueError, match="saved by another optimizer"):
        Trainer(tiny_config(tmp_path / "run", data_dir, max_steps=4, optimizer="muon")).fit(resume=True)
    assert os.path.isdir(ckpt.step_dir(str(tmp_path / "run"), 2))
