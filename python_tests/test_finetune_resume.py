"""A resumed DPO or PPO run must use the models the stopped one used: DPO's reference and PPO's reward model
are recorded in the training state by content (base_fingerprint), as the base is, not by path. A moved or
renamed copy resumes; another model is refused, at another path or at the same one; a state saved before
the fingerprints were recorded resumes as before. The tiny setups of test_dpo and test_ppo."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from llmkern.data.tokenizer import get_tokenizer
from llmkern.finetune.base import save_finetuned
from llmkern.finetune.dpo import DPOConfig, run_dpo
from llmkern.finetune.ppo import module_fingerprint, run_ppo
from llmkern.finetune.reward import RewardModel, save_reward_model
from llmkern.finetune.sft import run_sft
from llmkern.model import GPT, GPTConfig
from llmkern.train.checkpoint import load_checkpoint
from llmkern.train.metrics import read_metrics

from test_dpo import make_base
from test_finetune_sft import sft_config
from test_ppo import HighByteReward, make_ppo_run


@pytest.fixture(autouse=True)
def no_charts(monkeypatch):
    """The PNG charts each run draws take most of these tiny runs' time and are not what is tested here."""
    import llmkern.finetune.loop as loop
    import llmkern.train.metrics as metrics

    for module in (loop, metrics):
        monkeypatch.setattr(module, "plot_metrics", lambda *args, **kwargs: None)


def state_meta_path(out_dir, step: int):
    return os.path.join(out_dir, "train_state", "checkpoints", f"step_{step:07d}", "meta.json")


def as_older_llmkern_wrote_it(out_dir, step: int, key: str, **old) -> None:
    """The training state of `step` without the fingerprint `key` (and with the `old` entries), as an older
    llmkern saved it."""
    path = state_meta_path(out_dir, step)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    position = meta["finetune_state"]["position"]
    del position[key]
    position.update(old)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f)


# --- DPO: --reference ----------------------------------------------------------------------------------

def test_a_dpo_resume_checks_the_reference_by_content_not_by_path(tmp_path):
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "chosen": str(i), "rejected": "No."}
                                for i in range(6)]))
    make_base(tmp_path / "base")
    make_base(tmp_path / "ref", seed=1)
    make_base(tmp_path / "other", seed=2)  # the same shape, other weights
    config = DPOConfig(base=str(tmp_path / "base"), reference=str(tmp_path / "ref"), data=str(data),
                       out_dir=str(tmp_path / "dpo"), max_steps=2, batch_size=2, max_len=256, val_fraction=0.0,
                       ckpt_interval=1, keep_train_state=True, device="cpu", progress=False)

    def resume(reference):
        return run_dpo(dataclasses.replace(config, resume=True, reference=str(reference)))["steps"]

    run_dpo(config)  # its state at its end, step 2, is kept
    assert resume(tmp_path / "ref") == 2
    refused = r"reference_sha256: --reference is not the reference model the run started with"
    with pytest.raises(ValueError, match=refused):
        resume(tmp_path / "other")
    with pytest.raises(ValueError, match=refused):
        resume("")  # the base itself: another model than the reference
    os.makedirs(tmp_path / "moved")
    os.rename(tmp_path / "ref", tmp_path / "moved" / "renamed")
    assert resume(tmp_path / "moved" / "renamed") == 2
    shutil.copytree(tmp_path / "other", tmp_path / "ref")  # another model where the reference was
    with pytest.raises(ValueError, match=refused):
        resume(tmp_path / "ref")

    # "" stands for the base: a copy of the base named as the reference is the same reference
    config = dataclasses.replace(config, reference="", out_dir=str(tmp_path / "dpo_on_base"))
    run_dpo(config)
    shutil.copytree(tmp_path / "base", tmp_path / "base_copy")
    assert resume(tmp_path / "base_copy") == 2
    with pytest.raises(ValueError, match=refused):
        resume(tmp_path / "other")

    # a state from before the fingerprint was recorded (it held the path): resumed on any reference
    as_older_llmkern_wrote_it(config.out_dir, 2, "reference_sha256", reference="")
    assert resume(tmp_path / "other") == 2


# --- PPO: --reward_model, and the reference (the base) -------------------------------------------------

def save_tiny_reward_model(path, seed: int) -> str:
    torch.manual_seed(seed)
    rm = RewardModel(GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=32, n_layer=1, n_head=2,
                                               n_embd=32, backend="torch")))
    save_reward_model(str(path), 0, rm, get_tokenizer("bytes"))
    return str(path)


def test_a_ppo_resume_checks_the_reward_model_and_the_base_by_content_not_by_path(tmp_path):
    save_tiny_reward_model(tmp_path / "rm", seed=1)
    save_tiny_reward_model(tmp_path / "other_rm", seed=2)  # the same shape, other weights
    config = make_ppo_run(tmp_path, reward_model=str(tmp_path / "rm"), max_steps=2, ckpt_interval=1,
                          eval_interval=0, keep_train_state=True, rollout_batch=4, batch_size=4)
    base_config = GPTConfig.from_dict(load_checkpoint(str(tmp_path / "base")).meta["model_config"])
    torch.manual_seed(3)
    save_finetuned(str(tmp_path / "other_base"), 0, GPT(base_config).state_dict(),
                   {"model_config": base_config.to_dict(), "tokenizer": "bytes"})

    def resume(**change):
        return run_ppo(dataclasses.replace(config, resume=True, **change))["iterations"]

    run_ppo(config)  # its state at its end, iteration 2, is kept
    assert resume() == 2
    refused = r"reward_model_sha256: --reward_model is not the reward model the run started with"
    with pytest.raises(ValueError, match=refused):
        resume(reward_model=str(tmp_path / "other_rm"))
    os.makedirs(tmp_path / "moved")
    os.rename(tmp_path / "rm", tmp_path / "moved" / "rm_renamed")
    assert resume(reward_model=str(tmp_path / "moved" / "rm_renamed")) == 2
    shutil.copytree(tmp_path / "other_rm", tmp_path / "rm")  # another reward model where it was
    with pytest.raises(ValueError, match=refused):
        resume(reward_model=str(tmp_path / "rm"))

    # the reference is a frozen copy of the base: another base is refused, a moved one resumes
    rm = str(tmp_path / "moved" / "rm_renamed")
    with pytest.raises(ValueError, match="base_sha256: --base is not the model the run started from"):
        resume(reward_model=rm, base=str(tmp_path / "other_base"))
    os.rename(tmp_path / "base", tmp_path / "moved" / "base_renamed")
    assert resume(reward_model=rm, base=str(tmp_path / "moved" / "base_renamed")) == 2

    # a state from before the fingerprint was recorded (it held the path): resumed on any reward model
    as_older_llmkern_wrote_it(config.out_dir, 2, "reward_model_sha256", reward_model=config.reward_model)
    assert resume(reward_model=str(tmp_path / "other_rm"), base=str(tmp_path / "moved" / "base_renamed")) == 2


class ScaledHighByteReward(HighByteReward):
    """A hand-made reward model with a weight."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, ids, lengths):
        return self.scale * super().forward(ids, lengths)


def test_a_reward_model_passed_as_a_module_is_fingerprinted_by_its_class_and_weights(tmp_path):
    assert module_fingerprint(ScaledHighByteReward(2.0)) == module_fingerprint(ScaledHighByteReward(2.0))
    assert module_fingerprint(ScaledHighByteReward(2.0)) != module_fingerprint(ScaledHighByteReward(3.0))
    assert module_fingerprint(HighByteReward()) not in (module_fingerprint(ScaledHighByteReward(1.0)), None)
    assert module_fingerprint(lambda ids, lengths: ids.sum(dim=1)) is None  # no weights to look at

    config = make_ppo_run(tmp_path, max_steps=2, ckpt_interval=1, eval_interval=0, keep_train_state=True,
                          rollout_batch=4, batch_size=4)
    run_ppo(config, reward_model=ScaledHighByteReward(2.0))  # its state at its end, iteration 2, is kept
    resume = dataclasses.replace(config, resume=True)
    assert run_ppo(resume, reward_model=ScaledHighByteReward(2.0))["iterations"] == 2
    with pytest.raises(ValueError, match="reward_model_sha256"):
        run_ppo(resume, reward_model=ScaledHighByteReward(3.0))


# --- a finished run that kept its training state --------------------------------------------------------

def test_resuming_a_finished_sft_run_that_kept_its_state_trains_nothing_and_keeps_its_model(tmp_path, monkeypatch):
    """keep_train_state=true keeps the state of the run's end: resumed, the run is complete, as a finished
    pretraining run is. No step trains again (which would replace the model with one that is not bitwise the
    same on a GPU), the log gets no line twice, and the summary tells the result. A log that was lost gets the
    final evaluation once more. Another length is refused: it would stretch the schedule the run trained on."""
    from llmkern.finetune import sft

    make_base(tmp_path / "base")
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(6)]))
    config = sft_config(str(tmp_path / "base"), str(data), tmp_path / "sft", max_steps=3, batch_size=2, max_len=256,
                        ckpt_interval=2, eval_interval=2, keep_train_state=True, num_samples=1, max_new_tokens=2)
    finished = run_sft(config)
    log_path = finished["metrics"]
    log = Path(log_path).read_text()
    model = load_checkpoint(finished["checkpoint"]).model

    def no_training(model, batch):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(sft, "lm_loss", no_training)
    resume = dataclasses.replace(config, resume=True)
    with pytest.warns(UserWarning, match=r"already complete: .* at its end \(3 steps\), so nothing is trained again"):
        again = run_sft(resume)
    assert (again["checkpoint"], again["steps"]) == (finished["checkpoint"], 3)
    assert again["train_loss_after"] == finished["train_loss_after"]
    assert Path(log_path).read_text() == log
    resaved = load_checkpoint(again["checkpoint"]).model
    assert all(torch.equal(resaved[name], tensor) for name, tensor in model.items())

    os.remove(log_path)
    with pytest.warns(UserWarning, match="already complete"):
        lost = run_sft(resume)
    assert [(r["kind"], r["step"]) for r in read_metrics(log_path)] == [("eval", 3)]
    assert lost["train_loss_after"] == finished["train_loss_after"]

    with pytest.raises(ValueError, match=r"'steps': \(3, 5\).*a resume cannot stretch"):
        run_sft(dataclasses.replace(resume, max_steps=5))
    assert all(torch.equal(load_checkpoint(config.out_dir).model[name], t) for name, t in model.items())
