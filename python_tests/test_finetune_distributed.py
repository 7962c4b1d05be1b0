"""Fine-tuning under torchrun: two gloo processes learn like one process at the same global batch, with
the gradients all-reduced (parallel="ddp") or the model sharded with FSDP2 (parallel="fsdp"), and a
stopped two-process run resumes exactly, each rank with its own RNG states."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from llmkern.data.tokenizer import ByteTokenizer
from llmkern.finetune import FinetuneConfig
from llmkern.finetune.base import save_finetuned
from llmkern.finetune.classify import ClassifyConfig, run_classify
from llmkern.finetune.data import encode_prompt_response, make_lm_batch
from llmkern.finetune.loop import fit, meta_copy, train_state_dir
from llmkern.finetune.sft import SFTConfig, run_sft
from llmkern.model import GPT, GPTConfig
from llmkern.train import checkpoint as ckpt
from llmkern.train.metrics import read_metrics

import spawned
from spawned import WORLD



def save_tiny_model(folder, preset="tiny", seed=0):
    """A tiny byte-level GPT (GPT-2's blocks, or with "tiny-llama" RoPE, RMSNorm, SwiGLU and an untied head) of
    random weights drawn from `seed`, saved as a checkpoint in `folder`."""
    torch.manual_seed(seed)
    config = GPTConfig.from_preset(preset, vocab_size=257, block_size=256, n_layer=1, n_head=2, n_embd=32,
                                   backend="torch")
    save_finetuned(str(folder), 0, GPT(config).state_dict(), {"model_config": config.to_dict(), "tokenizer": "bytes"})


def make_run(tmp_path, preset="tiny"):
    """A tiny base (save_tiny_model) and 12 short instruction examples."""
    save_tiny_model(tmp_path / "base", preset)
    examples = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(12)]
    (tmp_path / "data.json").write_text(json.dumps(examples))


def sft_config(tmp_path, out, grad_accum, **overrides):
    # a step: 2 micro-batches of 2 examples, accumulated in one process or one per rank in two
    settings = dict(base=str(tmp_path / "base"), data=str(tmp_path / "data.json"), out_dir=str(tmp_path / out),
                    max_steps=5, batch_size=2, grad_accum=grad_accum, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                    val_fraction=0.25, eval_interval=2, ckpt_interval=3, num_samples=1, max_new_tokens=4,
                    device="cpu", progress=False, seed=5)
    settings.update(overrides)
    return SFTConfig(**settings)


def _worker(rank, port, tmp_path, resume, out="multi", overrides=None, leave_stopped=False):
    spawned.enter(rank, port)
    if leave_stopped:  # the run's step-3 state left in place, as a run stopped after step 3 leaves it (a finished
        # run deletes its state, or with keep_train_state keeps the end's, from which a resume trains nothing)
        import llmkern.finetune.sft

        llmkern.finetune.sft.drop_train_state = lambda config: None
    run_sft(sft_config(tmp_path, out, grad_accum=1, resume=resume, **(overrides or {})))
    spawned.leave()



def run_two_processes(tmp_path, resume=False, out="multi", leave_stopped=False, **overrides):
    mp.start_processes(_worker, args=(spawned.free_port(), tmp_path, resume, out, overrides, leave_stopped),
                       nprocs=WORLD, join=True, start_method="spawn")


def _dropout_worker(rank, port, tmp_path):
    """fit() 5 steps with dropout, each rank drawing its own masks (training state saved at step 3);
    then, in the same processes, a fresh model resumes a copy of that state to step 5. Each rank
    writes both runs' final weights."""
    spawned.enter(rank, port)
    from llmkern.train import distributed

    tok = ByteTokenizer()
    examples = [encode_prompt_response(tok, f"{i} * 3 = ", str(3 * i), 24) for i in range(8)]
    collate = lambda rows: make_lm_batch(rows, 0)  # noqa: E731

    def settings(out, **kw):
        return FinetuneConfig(out_dir=str(tmp_path / out), max_steps=5, batch_size=2, lr=3e-3, warmup_steps=1,
                              ckpt_interval=3, progress=False, seed=5, **kw)

    def lm_loss(model, batch):
        return model(batch["idx"], batch["targets"])[1], {}

    def final_weights(model, name):
        weights = {k: v.clone() for k, v in model.state_dict().items()}  # clones: tied weights stored apart
        save_file(weights, str(tmp_path / f"{name}_rank{rank}.safetensors"))

    whole = tiny_dropout_gpt()
    torch.manual_seed(100 + rank)  # from here on the ranks' generators differ, as their dropout masks may
    fit(whole, lm_loss, examples, collate, settings("whole"))
    final_weights(whole, "whole")
    if rank == 0:  # the state the uninterrupted run saved at step 3, as a stopped run would have left it
        shutil.copytree(train_state_dir(settings("whole")), train_state_dir(settings("stopped")))
    distributed.barrier(distributed.detect())
    resumed = tiny_dropout_gpt()  # the same on both ranks: only the restored states tell them apart again
    fit(resumed, lm_loss, examples, collate, settings("stopped", resume=True))
    final_weights(resumed, "resumed")
    spawned.leave()


def tiny_dropout_gpt():
    torch.manual_seed(4)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=32,
                                     dropout=0.2, backend="torch"))


def numbers(run_dir):
    """What a run computes, without its timings."""
    keep = ("kind", "step", "loss", "lr", "grad_norm", "train_loss", "val_loss")
    return [{k: v for k, v in r.items() if k in keep} for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def test_two_gloo_processes_fine_tune_like_one(tmp_path):
    make_run(tmp_path)
    run_sft(sft_config(tmp_path, "single", grad_accum=2))
    run_two_processes(tmp_path, leave_stopped=True)  # its step-3 state left: the resume below starts there

    spawned.assert_same_run(tmp_path / "single", tmp_path / "multi")  # rank 0 wrote the model
    multi = numbers(tmp_path / "multi")
    assert os.path.isfile(tmp_path / "multi" / "responses.json")

    # a stopped two-process run (the state of step 3, left) resumes to the same numbers
    os.remove(tmp_path / "multi" / "metrics.jsonl")  # even the log lost: the state holds what matters
    run_two_processes(tmp_path, resume=True)
    resumed = numbers(tmp_path / "multi")
    assert [r["step"] for r in resumed if r["kind"] == "train"] == [4, 5]
    assert [r for r in resumed if r["kind"] == "train"] == [r for r in multi if r["kind"] == "train" and r["step"] > 3]


def test_a_resumed_two_process_run_draws_each_ranks_own_random_numbers(tmp_path):
    # Ranks whose dropout masks differ: a resume that gave rank 1 rank 0's RNG states (as training states
    # did when they held one process's) would draw other masks on rank 1 and change the loss.
    mp.start_processes(_dropout_worker, args=(spawned.free_port(), tmp_path), nprocs=WORLD, join=True, start_method="spawn")

    whole, resumed = numbers(tmp_path / "whole"), numbers(tmp_path / "stopped")
    assert [r["step"] for r in resumed if r["kind"] == "train"] == [4, 5]
    assert [r for r in resumed if r["kind"] == "train"] == [r for r in whole if r["kind"] == "train" and r["step"] > 3]
    for rank in range(WORLD):
        expected = load_file(str(tmp_path / f"whole_rank{rank}.safetensors"))
        got = load_file(str(tmp_path / f"resumed_rank{rank}.safetensors"))
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (rank, name)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_fsdp_fine_tunes_like_one_process_and_resumes(tmp_path, lora_rank):
    # The same global batch: one process accumulating 2 micro-batches, or 2 ranks sharing a sharded model.
    # llmkern's AdamW (one process) and torch's (FSDP2's DTensor shards) compute the same update in a
    # different order, and the norm is reduced over the ranks: equal up to float32 rounding.
    make_run(tmp_path)
    run_sft(sft_config(tmp_path, "single", grad_accum=2, lora_rank=lora_rank))
    run_two_processes(tmp_path, out="fsdp", parallel="fsdp", lora_rank=lora_rank, leave_stopped=True)

    spawned.assert_same_run(tmp_path / "single", tmp_path / "fsdp")  # a whole plain GPT (LoRA merged)
    sharded, two = numbers(tmp_path / "fsdp"), ckpt.load_checkpoint(str(tmp_path / "fsdp"))
    base = load_file(str(tmp_path / "base" / "checkpoints" / "step_0000000" / "model.safetensors"))
    assert not torch.equal(two.model["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])  # it learned
    assert os.path.isfile(tmp_path / "fsdp" / "lora.safetensors") == bool(lora_rank)

    # the stopped run (its step-3 state left, the log lost) resumes to the same numbers and weights, bitwise;
    # rank 0 alone reads the training state's weights and optimizer, the other rank its meta.json and RNG states
    finished = ckpt.latest_checkpoint(str(tmp_path / "fsdp"))
    os.remove(tmp_path / "fsdp" / "metrics.jsonl")
    mp.start_processes(_recording_worker, args=(spawned.free_port(), tmp_path, {"resume": True, "lora_rank": lora_rank}),
                       nprocs=WORLD, join=True, start_method="spawn")
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert records[0]["reads"] == ["load_gpt", *BASE_READ, *STATE_READ]  # the base, then the training state
    assert records[1]["reads"] == ["load_checkpoint_without_weights"]
    resumed = numbers(tmp_path / "fsdp")
    later = [r for r in sharded if r["kind"] == "train" and r["step"] > 3]
    assert [r for r in resumed if r["kind"] == "train"] == later
    again = ckpt.load_checkpoint(str(tmp_path / "fsdp"))
    assert again.path == finished
    for name in two.model:
        assert torch.equal(again.model[name], two.model[name]), name


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_meta_copy_has_the_models_shapes_and_no_weights(preset):
    # shard_copy's starting point: on rank 0 a deepcopy would be a second whole model in host memory
    from llmkern.finetune.lora import apply_lora

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=32,
                                      backend="torch"))
    apply_lora(model, 2, 4.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = meta_copy(model)
    assert all(p.is_meta for p in twin.parameters()) and all(b.is_meta for b in twin.buffers())
    assert [(n, p.shape, p.requires_grad) for n, p in twin.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in model.named_parameters()]
    assert (twin.lm_head.weight is twin.wte.weight) == model.config.tie_embeddings
    assert not any(p.is_meta for p in model.parameters())  # the model itself is left as it was
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


BASE_READ = ["load_model_checkpoint", "load_file"]  # a base: its weights alone, never its state file
# a training state: the whole checkpoint, its weights, then its state file
STATE_READ = ["load_checkpoint", "load_model_checkpoint", "load_file", "load_file"]


def _recording_worker(rank, port, tmp_path, overrides):
    """run_sft under fsdp, writing down (as tmp_path/rank<rank>.json) which reads of a model or checkpoint this rank
    made (spawned.record_checkpoint_reads, and load_gpt) and whether the model load_base gave it, and the one it
    holds after the run, were on the meta device."""
    spawned.enter(rank, port)
    import llmkern.finetune.base
    import llmkern.finetune.sft
    from llmkern.finetune.loop import is_on_meta

    reads, held = [], {}
    load_gpt = llmkern.finetune.base.load_gpt

    def recording_load_gpt(*args, **kwargs):
        reads.append("load_gpt")
        return load_gpt(*args, **kwargs)

    llmkern.finetune.base.load_gpt = recording_load_gpt
    spawned.record_checkpoint_reads(reads)
    load_base = llmkern.finetune.sft.load_base

    def keeping_load_base(*args, **kwargs):
        model, tokenizer, meta = load_base(*args, **kwargs)
        held.update(model=model, loaded_on_meta=is_on_meta(model))
        return model, tokenizer, meta

    llmkern.finetune.sft.load_base = keeping_load_base
    run_sft(sft_config(tmp_path, "fsdp", grad_accum=1, parallel="fsdp", **overrides))
    record = {"reads": reads, "loaded_on_meta": held["loaded_on_meta"], "ends_on_meta": is_on_meta(held["model"])}
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(record))
    spawned.leave()


def test_fsdp_reads_the_base_on_rank_0_alone(tmp_path):
    # A 7B model is 28 GB in fp32: every rank reading it whole (and copying it) filled the host. Rank 0 alone
    # reads it now; the other ranks hold its shapes (the meta device) and get their shards from rank 0's copy.
    # The base here has RoPE (tables no state dict holds, rebuilt on the device) and an untied LM head; LoRA's
    # adapters, drawn on rank 0, reach every rank.
    make_run(tmp_path, preset="tiny-llama")
    run_sft(sft_config(tmp_path, "single", grad_accum=2, lora_rank=2))
    mp.start_processes(_recording_worker, args=(spawned.free_port(), tmp_path, {"lora_rank": 2}), nprocs=WORLD,
                       join=True, start_method="spawn")

    spawned.assert_same_run(tmp_path / "single", tmp_path / "fsdp")
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert records[0] == {"reads": ["load_gpt", *BASE_READ], "loaded_on_meta": False, "ends_on_meta": False}
    for record in records[1:]:
        assert record == {"reads": [], "loaded_on_meta": True, "ends_on_meta": True}


def _classify_worker(rank, port, settings):
    spawned.enter(rank, port)
    from llmkern.finetune.classify import ClassifyConfig, run_classify

    run_classify(ClassifyConfig(**settings))
    spawned.leave()


def test_fsdp_classifier_like_one_process(tmp_path):
    # The head is made after loading, on rank 0's CPU and as shapes elsewhere: every rank trains rank 0's draw,
    # and rank 0 saves the whole classifier (body and head).
    make_run(tmp_path)
    rows = [{"text": f"{'high' if i % 2 else 'low'} {i}", "label": i % 2} for i in range(12)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"base": str(tmp_path / "base"), "data": str(tmp_path / "labels.jsonl"), "max_steps": 3,
                "batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "val_fraction": 0.25,
                "eval_interval": 0, "ckpt_interval": 0, "device": "cpu", "progress": False, "seed": 5}
    run_classify(ClassifyConfig(out_dir=str(tmp_path / "single"), grad_accum=2, **settings))
    multi = dict(settings, out_dir=str(tmp_path / "fsdp"), grad_accum=1, parallel="fsdp")
    mp.start_processes(_classify_worker, args=(spawned.free_port(), multi), nprocs=WORLD, join=True,
                       start_method="spawn")

    spawned.assert_same_run(tmp_path / "single", tmp_path / "fsdp")
    assert any(name.startswith("head.") for name in ckpt.load_checkpoint(str(tmp_path / "fsdp")).model)


def _missing_base_worker(rank, port, folder):
    spawned.enter(rank, port)
    config = sft_config(Path(folder), "multi", grad_accum=1, parallel="fsdp", base=str(Path(folder) / "nothing"))
    spawned.record_and_exit(folder, rank, lambda: run_sft(config))


def test_fsdp_base_that_rank_0_cannot_read_stops_every_rank(tmp_path):
    # the other ranks wait for rank 0's broadcast of the model's shapes: not forever when its read failed
    make_run(tmp_path)
    errors, exitcodes = spawned.run_failing_pair(_missing_base_worker, str(tmp_path))
    assert "nothing" in errors[0] and not errors[0].startswith("RuntimeError"), errors[0]
    assert errors[1] == (f"RuntimeError: loading the base model {str(tmp_path / 'nothing')!r} failed on rank 0 "
                         f"(its log has the error): rank 1 stops too")
    assert exitcodes == [1, 1]


def _damaged_state_worker(rank, port, folder):
    spawned.enter(rank, port)
    config = sft_config(Path(folder), "multi", grad_accum=1, parallel="fsdp", resume=True)
    spawned.record_and_exit(folder, rank, lambda: run_sft(config))


def test_fsdp_training_state_that_rank_0_cannot_read_stops_every_rank(tmp_path):
    # Rank 0 alone reads (and checks) the weights of the training state; the other ranks wait for its broadcast,
    # so not forever when its read failed
    make_run(tmp_path)
    run_sft(sft_config(tmp_path, "multi", grad_accum=2, max_steps=1, keep_train_state=True))
    state = ckpt.latest_checkpoint(train_state_dir(sft_config(tmp_path, "multi", grad_accum=2)))
    weights = os.path.join(state, "model.safetensors")
    data = bytearray(Path(weights).read_bytes())
    data[-20] ^= 0x01  # among the tensors' bytes: only the file's hash tells
    Path(weights).write_bytes(bytes(data))
    errors, exitcodes = spawned.run_failing_pair(_damaged_state_worker, str(tmp_path))
    assert errors[0].startswith("ValueError") and "model.safetensors differs" in errors[0], errors[0]
    assert errors[1] == (f"RuntimeError: reading the checkpoint {state} failed on rank 0 (its log has the error): "
                         f"rank 1 stops too")
    assert exitcodes == [1, 1]


def test_fsdp_needs_torchrun_and_is_not_for_ppo(tmp_path):
    make_run(tmp_path)
    with pytest.raises(ValueError, match="torchrun"):
        run_sft(sft_config(tmp_path, "alone", grad_accum=1, parallel="fsdp"))
    from llmkern.finetune.ppo import PPOConfig, run_ppo

    with pytest.raises(ValueError, match="PPO runs in one process"):
        run_ppo(PPOConfig(base=str(tmp_path / "base"), data=str(tmp_path / "data.json"), parallel="fsdp",
                          reward_model=str(tmp_path / "base"), device="cpu", progress=False))
    with pytest.raises(ValueError, match="parallel must be one of"):
        sft_config(tmp_path, "zero", grad_accum=1, parallel="zero3").validate()


def preference_settings(tmp_path):
    """The settings of a DPO or reward-model run on 10 preference pairs (8 train, in 4 batches of 2; 2 held out)
    from the base of make_run; the caller adds out_dir, grad_accum and parallel."""
    pairs = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "chosen": str(2 * i + 1), "rejected": str(2 * i)}
             for i in range(10)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    return {"base": str(tmp_path / "base"), "data": str(tmp_path / "pairs.json"), "max_steps": 3, "batch_size": 2,
            "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "val_fraction": 0.2, "eval_interval": 0,
            "ckpt_interval": 0, "device": "cpu", "progress": False, "seed": 5}


def _fit_keeping_reference_logps(reference_logps: list[float]):
    """loop.fit, which first appends to reference_logps the reference log-probs (chosen, rejected) that its
    training examples carry (DPO's; none for the reward model's)."""
    from llmkern.finetune import loop

    real_fit = loop.fit

    def fit_keeping(model, loss_fn, train_examples, *args, **kwargs):
        for example in train_examples:
            if isinstance(example, dict):
                reference_logps.extend((example["ref_chosen"], example["ref_rejected"]))
        return real_fit(model, loss_fn, train_examples, *args, **kwargs)

    return fit_keeping


def _preference_worker(rank, port, tmp_path, method, settings):
    """run_dpo or run_reward (`method`) under fsdp, writing down (as tmp_path/rank<rank>.json) which reads of a
    model or checkpoint this rank made (spawned.record_checkpoint_reads, and load_gpt), whether each model that
    load_base gave it was on the meta device, whether the first (the policy, the reward model's body) is there
    after the run, the reference log-probs its training examples carried and the run's train_eval."""
    spawned.enter(rank, port)
    import llmkern.finetune.base
    import llmkern.finetune.loop
    from llmkern.finetune import get_method
    from llmkern.finetune.loop import is_on_meta

    reads, loaded, reference_logps = [], [], []
    load_gpt, load_base = llmkern.finetune.base.load_gpt, llmkern.finetune.base.load_base

    def recording_load_gpt(*args, **kwargs):
        reads.append("load_gpt")
        return load_gpt(*args, **kwargs)

    def keeping_load_base(*args, **kwargs):
        model, tokenizer, meta = load_base(*args, **kwargs)
        loaded.append((model, is_on_meta(model)))
        return model, tokenizer, meta

    # the recipes import load_base and fit from their modules as they run
    llmkern.finetune.base.load_gpt, llmkern.finetune.base.load_base = recording_load_gpt, keeping_load_base
    llmkern.finetune.loop.fit = _fit_keeping_reference_logps(reference_logps)
    spawned.record_checkpoint_reads(reads)
    config_cls, run = get_method(method)
    summary = run(config_cls(**settings))
    record = {"reads": reads, "loaded_on_meta": [on_meta for _, on_meta in loaded],
              "ends_on_meta": is_on_meta(loaded[0][0]), "reference_logps": reference_logps,
              "train_eval": summary["train_eval"]}
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(record))
    spawned.leave()


def assert_same_run_but(single_dir, other_dir, left_out):
    """spawned.assert_same_run, with the weights named in `left_out` not compared."""
    single, other = (read_metrics(os.path.join(str(d), "metrics.jsonl")) for d in (single_dir, other_dir))
    assert [(r["kind"], r["step"]) for r in other] == [(r["kind"], r["step"]) for r in single]
    for a, b in zip(single, other):
        for key in ("loss", "grad_norm", "train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a["step"])
    one, two = ckpt.load_checkpoint(str(single_dir)).model, ckpt.load_checkpoint(str(other_dir)).model
    assert set(two) == set(one)
    for name in set(one) - set(left_out):
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def check_fsdp_preference_run(tmp_path, monkeypatch, method, settings, models, left_out=()):
    """A run of `method` ("dpo" or "reward") under fsdp in two processes computes what one process computes at
    the same global batch (the metrics, the saved model but for the weights in left_out, the reference log-probs
    every rank holds, the closing train evaluation every rank reports), and only rank 0 reads the `models` models
    (the base, DPO's reference) or holds them whole: the other ranks get them on the meta device, and keep the
    policy there."""
    from llmkern.finetune import get_method, loop

    config_cls, run = get_method(method)
    reference_logps = []
    monkeypatch.setattr(loop, "fit", _fit_keeping_reference_logps(reference_logps))
    single = run(config_cls(out_dir=str(tmp_path / "single"), grad_accum=2, **settings))
    assert len(reference_logps) == (2 * single["train_examples"] if method == "dpo" else 0)
    multi = dict(settings, out_dir=str(tmp_path / "fsdp"), grad_accum=1, parallel="fsdp")
    mp.start_processes(_preference_worker, args=(spawned.free_port(), tmp_path, method, multi), nprocs=WORLD,
                       join=True, start_method="spawn")

    assert [r["step"] for r in numbers(tmp_path / "single") if r["kind"] == "train"] == [1, 2, 3]
    assert_same_run_but(tmp_path / "single", tmp_path / "fsdp", left_out)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert records[0]["reads"] == ["load_gpt", *BASE_READ] * models
    assert records[0]["loaded_on_meta"] == [False] * models and not records[0]["ends_on_meta"]
    for record in records[1:]:
        assert record["reads"] == [] and record["loaded_on_meta"] == [True] * models and record["ends_on_meta"]
    for record in records:
        assert record["reference_logps"] == pytest.approx(reference_logps, rel=1e-5, abs=1e-6)
        assert record["train_eval"].keys() == single["train_eval"].keys()
        assert record["train_eval"] == pytest.approx(single["train_eval"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("preset,reference", [("tiny", False), ("tiny-llama", True)])
def test_fsdp_dpo_like_one_process(tmp_path, monkeypatch, preset, reference):
    # DPO's log-probs come from GPT.hidden_states and GPT.head, not forward: the sharded root's weights
    # (the embedding, tied to the LM head in "tiny") must be gathered for them and their gradients reduced.
    # The reference (the base itself, or a model of other weights) is sharded like the policy to score the
    # pairs, each rank its share (4 batches of training pairs and 1 held out: one rank scores a batch more),
    # every rank getting all the log-probs; a whole model per rank once filled the host and each GPU.
    make_run(tmp_path, preset)
    settings = preference_settings(tmp_path)
    if reference:
        save_tiny_model(tmp_path / "reference", preset, seed=1)
        settings["reference"] = str(tmp_path / "reference")
    check_fsdp_preference_run(tmp_path, monkeypatch, "dpo", settings, models=2 if reference else 1)


def test_fsdp_reward_model_like_one_process(tmp_path, monkeypatch):
    # The head is made after loading, on rank 0's CPU and as shapes elsewhere: every rank trains rank 0's draw,
    # and rank 0 alone holds and saves the whole reward model (body and head). A pair's loss does not change
    # with a bias that moves both its scores alike (the head's; on GPT-2's blocks the final norm's and the keys'
    # too, hence RMSNorm and no biases here): that gradient is zero up to rounding, which AdamW's first steps
    # turn into steps of about lr whose sign the summation order decides, so the head's bias is not compared.
    make_run(tmp_path, preset="tiny-llama")
    check_fsdp_preference_run(tmp_path, monkeypatch, "reward", preference_settings(tmp_path), models=1,
                              left_out=("head.bias",))
    assert any(name.startswith("head.") for name in ckpt.load_checkpoint(str(tmp_path / "fsdp")).model)


# what rank 0 fails in, by the test's `where` ("log": a folder where rank 0 removes an old run's log)
_RANK_0_FAILS_IN = {"state": ("llmkern.train.checkpoint", "save_checkpoint"),  # the training state of step 3
                    "model": ("llmkern.train.checkpoint", "save_checkpoint"),  # no training state: the model
                    "run_dir": ("llmkern.train.metrics", "MetricsLog.__init__"),
                    "metrics": ("llmkern.train.metrics", "MetricsLog.write"),
                    "plot": ("llmkern.train.metrics", "plot_metrics"),
                    "responses": ("llmkern.finetune.sft", "write_json_atomic"),
                    "adapters": ("llmkern.finetune.lora", "save_lora_adapters")}  # with LoRA


def _failing_worker(rank, port, folder, where):
    """Rank 0 fails alone where the other rank then waits for it (at the next collective)."""
    spawned.enter(rank, port)
    if rank == 0 and where in _RANK_0_FAILS_IN:
        spawned.fail_in(*_RANK_0_FAILS_IN[where])
    config = sft_config(Path(folder), "multi", grad_accum=1, ckpt_interval=0 if where == "model" else 3,
                        lora_rank=2 if where == "adapters" else 0)
    spawned.record_and_exit(folder, rank, lambda: run_sft(config))


@pytest.mark.parametrize("where", ["state", "model", "run_dir", "metrics", "plot", "log", "responses", "adapters"])
def test_a_failure_of_rank_0_alone_stops_every_rank_with_its_cause(tmp_path, where):
    # Rank 0 alone writes the run's files (the metrics log, the training state, the charts, the model) while
    # the other ranks go on. When that failed (disk full), they waited at the next collective for a rank that
    # had given up: forever on nccl while it lived on, and on gloo until it exited, with "Connection closed by
    # peer". Now every rank stops at once and names what failed.
    make_run(tmp_path)
    if where == "log":
        os.makedirs(tmp_path / "multi" / "metrics.jsonl")  # rank 0 cannot remove it: IsADirectoryError
    errors, exitcodes = spawned.run_failing_pair(_failing_worker, str(tmp_path), where)
    assert errors[0].startswith("IsADirectoryError" if where == "log" else "OSError"), errors[0]
    what = {"state": "saving the training state of step 3", "model": "saving the model of step 5",
            "run_dir": "making the run folder", "metrics": "writing the metrics log", "plot": "plotting the metrics",
            "log": "clearing the old run's log and training state", "responses": "writing the sample responses",
            "adapters": "saving the LoRA adapters"}[where]
    assert errors[1] == f"RuntimeError: {what} failed on rank 0 (its log has the error): rank 1 stops too"
    assert exitcodes == [1, 1]


# what rank 0 fails in, in PPO (data parallel only): the first log write is the first iteration's when nothing is
# held out, and the evaluation of the untrained policy when something is
_RANK_0_FAILS_IN_PPO = {"metrics": ("llmkern.train.metrics", "MetricsLog.write"),
                        "eval": ("llmkern.finetune.ppo", "evaluate_prompts"),
                        "plot": ("llmkern.train.metrics", "plot_metrics")}


def _failing_ppo_worker(rank, port, folder, where):
    spawned.enter(rank, port)
    from llmkern.finetune.ppo import run_ppo
    from test_ppo import HighByteReward, ppo_config

    if rank == 0:
        spawned.fail_in(*_RANK_0_FAILS_IN_PPO[where])
    config = ppo_config(Path(folder), max_steps=1, rollout_batch=2, batch_size=2, ckpt_interval=0, seed=5,
                        val_fraction=0.2 if where == "eval" else 0.0)
    spawned.record_and_exit(folder, rank, lambda: run_ppo(config, reward_model=HighByteReward()))


@pytest.mark.parametrize("where", ["metrics", "eval", "plot"])
def test_a_failure_of_rank_0_alone_stops_every_ppo_rank_with_its_cause(tmp_path, where):
    # PPO's rank 0 alone writes the log, evaluates and plots: when that failed, the other ranks waited for it
    # at the next iteration's all-reduce, or at the save of the policy.
    from test_ppo import write_ppo_data

    write_ppo_data(tmp_path)
    errors, exitcodes = spawned.run_failing_pair(_failing_ppo_worker, str(tmp_path), where)
    assert errors[0].startswith("OSError"), errors[0]
    what = {"metrics": "writing the metrics log", "eval": "evaluating the policy after iteration 0",
            "plot": "plotting the metrics"}[where]
    assert errors[1] == f"RuntimeError: {what} failed on rank 0 (its log has the error): rank 1 stops too"
    assert exitcodes == [1, 1]
