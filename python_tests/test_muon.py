"""Muon for the hidden matrices beside llmkern's AdamW (llmkern.optim.muon), and optimizer="muon" in the trainer."""

import copy
import math
import os
import shutil

import pytest
import torch
from test_train import TINY_MODEL, data_dir, tiny_config, train_losses  # noqa: F401 (data_dir: a fixture)

from llmkern.model import GPT, GPTConfig
from llmkern.optim import AdamW, MuonWithAdamW, muon_parameters
from llmkern.optim.muon import split_groups
from llmkern.train import TrainConfig, Trainer
from llmkern.train import checkpoint as ckpt


def tiny_model(preset, seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset(preset, vocab_size=61, n_layer=2, n_embd=32, block_size=16, **overrides))


def muon_names(model):
    ids = {id(p) for p in muon_parameters(model)}
    return [name for name, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("preset, expected", [
    ("tiny", ["attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"]),  # GPT-2: biases to AdamW
    ("tiny-llama", ["attn.qkv.weight", "attn.proj.weight", "mlp.gate_up.weight", "mlp.proj.weight"]),
    # the stacked (E, out, in) experts to AdamW: torch's Muon takes 2-D parameters only
    ("tiny-moe", ["attn.qkv.weight", "attn.proj.weight", "mlp.router.weight"]),
])
def test_muon_steps_exactly_the_2d_matrices_of_the_blocks(preset, expected):
    model = tiny_model(preset)
    assert muon_names(model) == [f"blocks.{i}.{name}" for i in range(2) for name in expected]
    # every other parameter goes to AdamW, once, in the model's groups (decay on matrices, none on vectors)
    matrices = muon_parameters(model)
    groups = split_groups(model.optimizer_groups(0.1), matrices)
    rest = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in rest + matrices}) == len(rest) + len(matrices) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[0]["params"]} >= {"wte.weight"} and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def random_gradients(model, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def test_a_step_equals_torch_muon_and_llmkern_adamw_applied_by_hand():
    model = tiny_model("tiny-moe")
    by_hand = copy.deepcopy(model)
    lr, muon_lr, wd = 3e-3, 6e-3, 0.05
    combined = MuonWithAdamW(muon_parameters(model), split_groups(model.optimizer_groups(wd), muon_parameters(model)),
                             lr=lr, muon_lr=muon_lr, weight_decay=wd, momentum=0.9, betas=(0.9, 0.95))
    matrices = muon_parameters(by_hand)
    muon = torch.optim.Muon(matrices, lr=muon_lr, weight_decay=wd, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    adamw = AdamW(split_groups(by_hand.optimizer_groups(wd), matrices), lr=lr, betas=(0.9, 0.95))
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


def test_the_state_dict_round_trips_and_refuses_another_optimizers():
    model = tiny_model("tiny-llama")

    def make(m):
        return MuonWithAdamW(muon_parameters(m), split_groups(m.optimizer_groups(0.1), muon_parameters(m)),
                             lr=1e-3, muon_lr=1e-3, weight_decay=0.1)

    optimizer = make(model)
    random_gradients(model, 0)
    optimizer.step()
    saved = optimizer.state_dict()
    n_params = len(list(model.parameters()))
    assert sorted(saved["state"]) == list(range(n_params))  # numbered across both parts, as one optimizer's
    assert [sorted(saved["state"][i]) for i in (0, n_params - 1)] == [["momentum_buffer"],
                                                                       ["exp_avg", "exp_avg_sq", "step"]]
    other = copy.deepcopy(model)
    restored = make(other)
    restored.load_state_dict(copy.deepcopy(saved))  # load_state_dict keeps the tensors it is given
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
    ({"optimizer": "muon", "parallel": "fsdp"}, "optimizer='muon' does not run with parallel='fsdp'"),
    ({"optimizer": "muon", "muon_lr": -1.0}, "muon_lr must be >= 0 and finite"),
    ({"optimizer": "muon", "muon_lr": math.inf}, "muon_lr must be >= 0 and finite"),
    ({"optimizer": "muon", "muon_momentum": 1.0}, r"muon_momentum must be in \[0, 1\)"),
    ({"optimizer": "adam"}, "optimizer must be one of .*'muon'"),
])
def test_muon_settings_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields).validate()


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
