"""Edge cases of evaluation found by review: memory held across the runs of a win rate, perplexity's logits."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from llmkern.eval.perplexity import perplexity, sliding_windows
from llmkern.eval.win_rate import compare_runs
from llmkern.model import GPT, GPTConfig
from llmkern.train import checkpoint as ckpt


def tiny_gpt(block_size=32, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig.from_preset("tiny", vocab_size=257, block_size=block_size, n_layer=1, n_head=2, n_embd=32,
                                   backend="torch")
    return GPT(config).eval()


def save_run(run_dir, model):
    meta = {"model_config": model.config.to_dict(), "tokenizer": "bytes"}
    ckpt.save_checkpoint(str(run_dir), 1, model.state_dict(), {}, meta)
    return str(run_dir)


# --- win rate ----------------------------------------------------------------------------------------------

def test_compare_runs_holds_one_run_in_memory_at_a_time(tmp_path, monkeypatch):
    """The run's checkpoint (its weights and optimizer state on the host: ~12 bytes a parameter) stayed referenced
    while the baseline loaded, and the baseline's while the judge loaded and judged: twice the memory needed."""
    from llmkern.train import inference

    real_load = inference.load_trained_model
    loaded = []  # (weak reference, what it is) of every model and checkpoint loaded
    alive_at = {}  # when: what was still alive then

    def alive():
        gc.collect()
        return [what for ref, what in loaded if ref() is not None]

    def tracked_load(run_dir, device="auto"):
        alive_at[f"loading {run_dir}"] = alive()
        model, tokenizer, state = real_load(run_dir, device)
        loaded.extend([(weakref.ref(model), f"model of {run_dir}"), (weakref.ref(state), f"checkpoint of {run_dir}")])
        return model, tokenizer, state

    class RecordingJudge:
        def prefer(self, instructions, responses_a, responses_b):
            alive_at["judging"] = alive()
            return [0.5] * len(instructions)

    monkeypatch.setattr(inference, "load_trained_model", tracked_load)
    run_a = save_run(tmp_path / "a", tiny_gpt(seed=1))
    run_b = save_run(tmp_path / "b", tiny_gpt(seed=2))
    result = compare_runs(run_a, run_b, RecordingJudge(), ["Say hi.", "Count."], max_new_tokens=2, device="cpu")
    assert result["n"] == 2
    assert alive_at == {f"loading {run_a}": [], f"loading {run_b}": [], "judging": []}


def test_eval_command_lets_the_checkpoint_go_once_the_model_is_loaded(tmp_path, monkeypatch, capsys):
    """`llmkern eval` kept the checkpoint (weights and optimizer state on the host) referenced for the whole
    evaluation, beside the model."""
    import sys

    from llmkern.cli import main
    from llmkern.train import inference

    perplexity_module = sys.modules["llmkern.eval.perplexity"]  # the package's `perplexity` is the function
    real_load, real_perplexity = inference.load_trained_model, perplexity_module.perplexity_of_text
    checkpoints = []
    alive_when_scoring = []

    def tracked_load(run_dir, device="auto"):
        model, tokenizer, state = real_load(run_dir, device)
        checkpoints.append(weakref.ref(state))
        return model, tokenizer, state

    def tracked_perplexity(*args, **kwargs):
        gc.collect()
        alive_when_scoring.append(sum(ref() is not None for ref in checkpoints))
        return real_perplexity(*args, **kwargs)

    monkeypatch.setattr(inference, "load_trained_model", tracked_load)
    monkeypatch.setattr(perplexity_module, "perplexity_of_text", tracked_perplexity)
    run = save_run(tmp_path / "run", tiny_gpt())
    text = tmp_path / "text.txt"
    text.write_text("a short text to score")
    assert main(["eval", "--run", run, "--text", str(text), "--device", "cpu", "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert len(checkpoints) == 1 and alive_when_scoring == [0]


# --- perplexity -------------------------------------------------------------------------------------------

def test_perplexity_makes_logits_only_where_it_scores(monkeypatch):
    """Every window's history (half its tokens at the default stride) and its padding got (B, T, V) logits too,
    in the model's dtype and again in fp32: most of the memory at a large vocabulary, for nothing."""
    model = tiny_gpt(block_size=32)
    rng = torch.Generator().manual_seed(3)
    streams = [torch.randint(0, 257, (n,), generator=rng).tolist() for n in (90, 7, 40)]
    expected = perplexity_by_hand(model, streams, context=32, stride=8)
    rows_through_head = []
    real_head = model.head

    def counting_head(hidden):
        rows_through_head.append(hidden.shape[:-1].numel())
        return real_head(hidden)

    monkeypatch.setattr(model, "head", counting_head)
    result = perplexity(model, streams, context=32, stride=8, batch_size=3)
    assert result["tokens"] == 89 + 6 + 39 == sum(rows_through_head)
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def perplexity_by_hand(model, streams, context, stride):
    """The mean loss of sliding_windows' scored targets, one window at a time, in float64."""
    nll, count = 0.0, 0
    for stream in streams:
        for start, end, first in sliding_windows(len(stream), context, stride):
            with torch.no_grad():
                logits, _ = model(torch.tensor([stream[start:end]]))
            logp = F.log_softmax(logits[0].double(), -1)
            nll -= sum(float(logp[t - 1 - start, stream[t]]) for t in range(first + 1, end + 1))
            count += end - first
    return nll / count
