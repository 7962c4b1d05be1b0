"""`llmkern export` and save_hf_folder: a model written as a Hugging Face model folder reads back through llmkern's
own importer (load_hf_file) with the same logits, in every family; shards and their index as save_pretrained writes
them; dtypes; a LoRA-fine-tuned run's merged weights; the tokenizer's files (a tokenizer.json copied, a tiktoken
one written as one); the folder written atomically."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from test_finetune_sft import instruction_file, make_base, sft_config
from test_hf_gemma3 import gemma3_config_json

from llmkern import cli
from llmkern.finetune.base import save_finetuned
from llmkern.model import GPT, GPTConfig, hf_save, save_hf_folder
from llmkern.model.hf import config_from_hf_gemma3, load_hf_file, to_hf_llama
from llmkern.train.checkpoint import load_checkpoint
from llmkern.train.inference import load_trained_model

VOCAB, CTX = 100, 32
SMALL = {"vocab_size": VOCAB, "block_size": CTX, "n_embd": 32, "backend": "torch"}


def gpt2_config(**changes) -> GPTConfig:
    return GPTConfig.from_preset("tiny", n_head=2, **{**SMALL, **changes})


def llama_config(**changes) -> GPTConfig:
    return GPTConfig.from_preset("tiny-llama", n_head=4, n_kv_head=2, **{**SMALL, **changes})


def moe_config(**changes) -> GPTConfig:
    return GPTConfig.from_preset("tiny-moe", n_head=4, n_kv_head=2, **{**SMALL, **changes})


def gemma3_config() -> GPTConfig:
    return config_from_hf_gemma3(gemma3_config_json(), backend="torch")


def gemma2_config() -> GPTConfig:
    """Gemma 3's shape without QK-norm, with one RoPE base and Gemma 2's soft caps."""
    return dataclasses.replace(gemma3_config(), qk_norm=False, rope_local_theta=None, rope_scaling=None,
                               attn_softcap=2.0, logit_softcap=4.0)


# (a config, the model_type config.json must say): every family, and the Llama family's types
CASES = {
    "gpt2": (gpt2_config, "gpt2"),
    "llama": (llama_config, "llama"),
    "llama-tied": (lambda: llama_config(tie_embeddings=True), "llama"),
    "mistral": (lambda: llama_config(sliding_window=8), "mistral"),
    "qwen2": (lambda: llama_config(qkv_bias=True), "qwen2"),
    "qwen3": (lambda: llama_config(qk_norm=True, head_dim=16, tie_embeddings=True), "qwen3"),
    "phi3": (lambda: llama_config(rope_dim=4), "phi3"),
    "mixtral": (moe_config, "mixtral"),
    "qwen3-moe": (lambda: moe_config(qk_norm=True, norm_topk_prob=False, moe_layers=[1]), "qwen3_moe"),
    "gemma3": (gemma3_config, "gemma3_text"),
    "gemma2": (gemma2_config, "gemma2"),
}


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A GPT of config in eval mode with every parameter random: matrices around 0, vectors (norm scales, biases) in
    [0.7, 1.3], where Gemma's norm weights, written as w - 1 and read back as that + 1, come back exactly."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else 0.7 + 0.6 * torch.rand_like(p))
    return model


def logits(model: GPT, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        return model(idx)[0]


def read_folder(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, a name found twice an error."""
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                assert f.metadata() == {"format": "pt"}
                for key in list(f.keys()):
                    assert key not in tensors, f"{key} in two shards"
                    tensors[key] = f.get_tensor(key)
    return tensors


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("case", list(CASES))
def test_a_folder_reads_back_with_the_same_logits(case, tmp_path):
    make_config, model_type = CASES[case]
    model = random_model(make_config())
    out = tmp_path / "hf"
    paths = save_hf_folder(model, str(out))
    assert sorted(os.path.basename(p) for p in paths) == ["config.json", "generation_config.json", "model.safetensors"]
    config = read_json(out / "config.json")
    assert config["model_type"] == model_type
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["tie_word_embeddings"] == model.config.tie_embeddings
    # a tied output layer is the embeddings: written once, as save_pretrained writes it
    assert ("lm_head.weight" in read_folder(out)) == (not model.config.tie_embeddings)

    back, back_type = load_hf_file(str(out / "model.safetensors"), backend="torch")
    assert back_type == model_type
    assert torch.equal(logits(back.eval()), logits(model))


def test_shards_and_their_index_are_save_pretrained_s(tmp_path):
    model = random_model(llama_config())
    max_bytes = 3000
    out = tmp_path / "hf"
    paths = save_hf_folder(model, str(out), max_shard_bytes=max_bytes)
    index = read_json(out / hf_save.INDEX_NAME)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    count = len(shards)
    assert count > 3
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        shards + [hf_save.INDEX_NAME, "config.json", "generation_config.json"])
    tensors = read_folder(out)  # every tensor in exactly one shard
    expected, _ = to_hf_llama(model)
    assert set(tensors) == set(expected) == set(index["weight_map"])
    for shard in shards:
        with safe_open(os.path.join(out, shard), "pt") as f:
            names = list(f.keys())
            assert all(index["weight_map"][name] == shard for name in names)
            sizes = [f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names]
        assert len(names) == 1 or sum(sizes) <= max_bytes  # only a tensor over the limit goes past it, alone
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor)
    # load_hf_file given any shard reads them all
    back, _ = load_hf_file(str(out / shards[-1]), backend="torch")
    assert torch.equal(logits(back.eval()), logits(model))


def test_shards_split_in_order_with_a_large_tensor_alone():
    weights = {name: torch.zeros(n, dtype=torch.uint8) for name, n in (("a", 6), ("b", 6), ("c", 2), ("d", 20),
                                                                        ("e", 2), ("f", 2), ("g", 7))}
    # as huggingface_hub's split_torch_state_dict_into_shards: a tensor over the limit becomes a shard at once,
    # before the one being filled
    assert hf_save.plan_shards(weights, 10) == [["a"], ["d"], ["b", "c", "e"], ["f", "g"]]
    assert hf_save.plan_shards(weights, 1000) == [list(weights)]
    assert hf_save.shard_file_names(1) == ["model.safetensors"]
    assert hf_save.shard_file_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_sizes_parse_as_save_pretrained_s():
    assert hf_save.parse_size("5GB") == 5 * 10**9
    assert hf_save.parse_size("500MB") == 5 * 10**8
    assert hf_save.parse_size("2GiB") == 2 * 2**30
    assert hf_save.parse_size("1.5KB") == 1500
    assert hf_save.parse_size("1000") == hf_save.parse_size(1000) == 1000
    for bad in ("5 parsecs", "GB", "0", "-5GB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            hf_save.parse_size(bad)
    with pytest.raises(TypeError, match="max_shard_size"):
        hf_save.parse_size(5.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_are_written_in_the_dtype_asked(dtype, tmp_path):
    model = random_model(llama_config())
    name = str(dtype).removeprefix("torch.")
    save_hf_folder(model, str(tmp_path / "hf"), dtype=name)
    config = read_json(tmp_path / "hf" / "config.json")
    assert config["torch_dtype"] == config["dtype"] == name
    tensors = read_folder(tmp_path / "hf")
    expected, _ = to_hf_llama(model)
    assert all(t.dtype == dtype for t in tensors.values())
    for key, tensor in expected.items():
        assert torch.equal(tensors[key], tensor.to(dtype))
    # read back, it is the model with its weights rounded to dtype
    rounded = random_model(llama_config())
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(dtype).float())
    back, _ = load_hf_file(str(tmp_path / "hf" / "model.safetensors"), backend="torch")
    assert torch.equal(logits(back.float().eval()), logits(rounded))


def test_the_dtype_defaults_to_the_model_s_own(tmp_path):
    model = random_model(gpt2_config()).to(torch.bfloat16)
    save_hf_folder(model, str(tmp_path / "hf"))
    assert read_json(tmp_path / "hf" / "config.json")["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_folder(tmp_path / "hf").values())
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_hf_folder(model, str(tmp_path / "other"), dtype="int8")


def test_a_format_that_cannot_express_the_model_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="cannot be written in the llama format: .*Llama-shaped|llama format"):
        save_hf_folder(random_model(gpt2_config()), str(tmp_path / "a"), family="llama")
    with pytest.raises(ValueError, match="gpt2 format: GPT-2 weights need a GPT-2-shaped model"):
        save_hf_folder(random_model(llama_config()), str(tmp_path / "b"), family="gpt2")
    with pytest.raises(ValueError, match="gemma3 format"):
        save_hf_folder(random_model(llama_config()), str(tmp_path / "c"), family="gemma3")
    with pytest.raises(ValueError, match="family must be one of"):
        save_hf_folder(random_model(llama_config()), str(tmp_path / "d"), family="bert")
    with pytest.raises(ValueError, match="no Hugging Face format here holds a model with pos='rope' and "
                                         "norm='layernorm'"):
        save_hf_folder(random_model(gpt2_config(pos="rope")), str(tmp_path / "e"))
    assert os.listdir(tmp_path) == []


def test_an_existing_folder_is_refused_unless_forced_and_then_replaced(tmp_path):
    model = random_model(gpt2_config())
    out = tmp_path / "hf"
    out.mkdir()
    save_hf_folder(model, str(out))  # an empty folder takes it
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds files"):
        save_hf_folder(model, str(out))
    assert (out / "notes.txt").read_text() == "mine"
    save_hf_folder(model, str(out), force=True)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left beside it
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_hf_folder(model, str(tmp_path / "file"), force=True)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_while_writing_leaves_no_folder_and_the_old_one_intact(existing, tmp_path, monkeypatch):
    import safetensors.torch

    real_save_file = safetensors.torch.save_file
    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    out = tmp_path / "hf"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(random_model(llama_config()), str(out), max_shard_bytes=3000, force=True)
    assert len(calls) == 3
    assert sorted(os.listdir(tmp_path)) == (["hf"] if existing else [])
    if existing:
        assert os.listdir(out) == ["notes.txt"]


def test_a_run_exports_as_the_hugging_face_family_it_started_from(tmp_path):
    # A Phi-3 file whose model a Llama config says as well: a run from it exports as Phi-3's, a run from that run
    # too; the same model with no such start as Llama's.
    model = random_model(llama_config(vocab_size=257))
    phi3 = tmp_path / "phi3"
    save_hf_folder(model, str(phi3), family="phi3")
    state, settings = model.state_dict(), {"model_config": model.config.to_dict(), "tokenizer": "bytes"}
    first = save_finetuned(str(tmp_path / "first"), 1, state, {
        **settings, "finetune": {"method": "sft", "base": str(phi3 / "model.safetensors")}})
    save_finetuned(str(tmp_path / "second"), 1, state, {**settings, "finetune": {"method": "dpo", "base": first}})
    save_finetuned(str(tmp_path / "scratch"), 1, state, settings)
    for run, model_type in (("first", "phi3"), ("second", "phi3"), ("scratch", "llama")):
        assert cli.main(["export", "--run", str(tmp_path / run), "--out", str(tmp_path / f"{run}-hf")]) == 0
        assert read_json(tmp_path / f"{run}-hf" / "config.json")["model_type"] == model_type
    # each run recorded the family when it saved, so it still exports as Phi-3 once the file has moved away
    shutil.move(phi3, tmp_path / "moved")
    for run in ("first", "second"):
        assert cli.main(["export", "--run", str(tmp_path / run), "--out", str(tmp_path / f"{run}-moved")]) == 0
        assert read_json(tmp_path / f"{run}-moved" / "config.json")["model_type"] == "phi3"
    # --format overrides it
    assert cli.main(["export", "--run", str(tmp_path / "first"), "--out", str(tmp_path / "forced"),
                     "--format", "llama"]) == 0
    assert read_json(tmp_path / "forced" / "config.json")["model_type"] == "llama"


def test_the_cli_exports_a_lora_fine_tuned_run_s_merged_weights(shared_data, tmp_path, capsys):
    base = make_base(str(tmp_path / "base"))
    run = tmp_path / "lora"
    from llmkern.finetune.sft import run_sft

    run_sft(sft_config(base, instruction_file(shared_data, tmp_path), run, max_steps=2, lr=1e-2, warmup_steps=1,
                       lora_rank=4, lora_targets="qkv", num_samples=1, max_new_tokens=2))
    out = tmp_path / "hf"
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    printed = capsys.readouterr().out
    assert "GPT2LMHeadModel" in printed and "float32" in printed and "no tokenizer files" not in printed
    assert os.path.isfile(out / hf_save.INDEX_NAME)
    # the byte tokenizer, written as a tokenizer.json of the 256 bytes and <|endoftext|>
    assert read_json(out / "special_tokens_map.json") == {"eos_token": "<|endoftext|>"}
    # no begin-of-sequence token: null, not left out (transformers' GPT-2 default would be 50256, past 257 ids)
    ids = {"bos_token_id": None, "eos_token_id": 256}
    assert read_json(out / "generation_config.json") == ids
    assert {k: read_json(out / "config.json")[k] for k in ids} == ids

    tuned, _, _ = load_trained_model(str(run), device="cpu")
    assert read_json(out / "tokenizer_config.json")["model_max_length"] == tuned.config.block_size
    back, _ = load_hf_file(str(out / "model-00001-of-00002.safetensors"), backend="torch")
    assert torch.equal(logits(back.eval()), logits(tuned))

    # --peft: the adapters alone, for the base's Hugging Face folder (test_peft_export checks their values)
    adapter = tmp_path / "adapter"
    assert cli.main(["export", "--run", str(run), "--out", str(adapter), "--peft", "--base-model", "hf/base"]) == 0
    assert "PEFT LoRA adapter" in capsys.readouterr().out
    settings = read_json(adapter / "adapter_config.json")
    assert (settings["peft_type"], settings["r"], settings["base_model_name_or_path"]) == ("LORA", 4, "hf/base")
    # beside the adapter, the run's tokenizer with its chat template, as the merged folder has them
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors",
                                           "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert "chat_template" in read_json(adapter / "tokenizer_config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert read_json(adapter / name) == read_json(out / name)
    for extra in (["--max-shard-size", "1GB"], ["--force", "--out", str(tmp_path)]):
        args = ["export", "--run", str(run), "--out", str(tmp_path / "adapter2"), "--peft", *extra]
        assert cli.main(args) == 2
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "m"), "--base-model", "hf/base"]) == 2
    assert "give --peft too" in capsys.readouterr().err
    # the adapters are in the weights: the attention's differ from the base's
    tensors = read_folder(out)
    base_qkv = load_checkpoint(base).model["blocks.0.attn.qkv.weight"]
    assert torch.equal(tensors["transformer.h.0.attn.c_attn.weight"], tuned.blocks[0].attn.qkv.weight.t())
    assert not torch.equal(tensors["transformer.h.0.attn.c_attn.weight"], base_qkv.t())
    # the byte tokenizer's end-of-text
    assert read_json(out / "generation_config.json") == {"bos_token_id": None, "eos_token_id": 256}
    # a second export there is refused, the first left as it was
    before = sorted(os.listdir(out))
    assert cli.main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def exported_run(tmp_path, spec: str, name: str) -> str:
    """A run of a random model tokenized with `spec`, exported by the command line to tmp_path / name."""
    from llmkern.data.tokenizer import get_tokenizer

    model = random_model(llama_config(vocab_size=get_tokenizer(spec).n_vocab))
    run = save_finetuned(str(tmp_path / f"run-{name}"), 1, model.state_dict(),
                         {"model_config": model.config.to_dict(), "tokenizer": spec})
    assert cli.main(["export", "--run", run, "--out", str(tmp_path / name)]) == 0
    return str(tmp_path / name)


def test_a_tiktoken_tokenizer_is_written_as_a_tokenizer_json(shared_data, tmp_path, capsys):
    from llmkern.data.bpe import train_bpe

    with open(os.path.join(shared_data, "the-verdict.txt"), encoding="utf-8") as f:
        text = f.read()
    tokenizer = train_bpe([text], 400, tmp_path / "verdict.tiktoken", num_workers=1)
    out = exported_run(tmp_path, tokenizer.spec, "hf")
    printed = capsys.readouterr().out
    assert "no tokenizer files" not in printed and "tokenizer.json" in printed
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert read_json(os.path.join(out, "tokenizer_config.json")) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False, "model_max_length": CTX}
    assert read_json(os.path.join(out, "special_tokens_map.json")) == {"eos_token": "<|endoftext|>"}
    assert read_json(os.path.join(out, "generation_config.json")) == {"bos_token_id": None, "eos_token_id": 399}
    tokenizers = pytest.importorskip("tokenizers")
    written = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    sample = text[:5000] + " 日本語 🙂 <|endoftext|>"
    assert written.encode(sample, add_special_tokens=False).ids == tokenizer.encoding.encode(sample,
                                                                                             allowed_special="all")
    from llmkern.data.tokenizer import get_tokenizer

    # llmkern reads the folder's tokenizer as the run's
    exported = get_tokenizer(os.path.join(out, "tokenizer.json"))
    assert (exported.eot_token, exported.bos_token, exported.n_vocab) == (399, None, 400)
    assert exported.encode(sample) == tokenizer.encode(sample)


def test_a_pattern_tokenizers_reads_otherwise_exports_without_tokenizer_files(shared_data, tmp_path, capsys):
    pytest.importorskip("tokenizers")  # the check that refuses it needs `tokenizers`
    from llmkern.data.bpe import train_bpe

    with open(os.path.join(shared_data, "the-verdict.txt"), encoding="utf-8") as f:
        text = f.read()[:20000]
    # tiktoken drops the text between the pieces (spaces, punctuation); Hugging Face would keep it
    tokenizer = train_bpe([text], 300, tmp_path / "gaps.tiktoken", pattern=r"\p{L}+", num_workers=1)
    with pytest.warns(UserWarning, match="no tokenizer files written: .*gives other pieces"):
        out = exported_run(tmp_path, tokenizer.spec, "hf")
    assert "no tokenizer files" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_the_cli_refuses_a_scoring_run_and_an_out_folder_holding_the_run(tmp_path, capsys):
    model = random_model(gpt2_config(vocab_size=257))
    state = {**model.state_dict(), "head.weight": torch.zeros(2, 32)}
    run = save_finetuned(str(tmp_path / "runs" / "classify"), 1, state, {
        "model_config": model.config.to_dict(), "tokenizer": "bytes", "finetune": {"method": "classify"}})
    assert cli.main(["export", "--run", run, "--out", str(tmp_path / "hf")]) == 2
    assert "export a pretraining or SFT/DPO/PPO/GRPO run" in capsys.readouterr().err
    assert cli.main(["export", "--run", run, "--out", str(tmp_path / "runs"), "--force"]) == 2
    assert "holds the run" in capsys.readouterr().err
    assert os.path.isdir(run)


def test_a_tokenizer_json_goes_with_the_model(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from test_hf_tokenizers_backend import LLAMA2_CONFIG, llama2_style, write

    from llmkern.data.tokenizer import get_tokenizer

    data = llama2_style()  # once: its training breaks ties differently from one call to the next
    with_config = write(str(tmp_path / "tok"), data, LLAMA2_CONFIG)
    without_config = write(str(tmp_path / "bare"), data)
    tokenizer = get_tokenizer(with_config)
    model = random_model(llama_config(vocab_size=tokenizer.n_vocab))
    for spec, name in ((with_config, "with"), (without_config, "without")):
        run = save_finetuned(str(tmp_path / f"run-{name}"), 1, model.state_dict(),
                             {"model_config": model.config.to_dict(), "tokenizer": spec})
        out = tmp_path / f"hf-{name}"
        assert cli.main(["export", "--run", run, "--out", str(out)]) == 0
        assert "no tokenizer files" not in capsys.readouterr().out
        with open(spec, "rb") as f, open(out / "tokenizer.json", "rb") as g:
            assert f.read() == g.read()
        written = read_json(out / "tokenizer_config.json")
        if name == "with":
            assert written == LLAMA2_CONFIG
        else:  # the end and begin tokens llmkern takes from the file, named for AutoTokenizer
            assert written == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "bos_token": "<s>"}
        exported = get_tokenizer(str(out / "tokenizer.json"))
        assert (exported.eot_token, exported.bos_token) == (tokenizer.eot_token, tokenizer.bos_token) == (2, 1)
        ids = {"bos_token_id": 1, "eos_token_id": 2}
        assert read_json(out / "generation_config.json") == ids
        assert {k: read_json(out / "config.json")[k] for k in ids} == ids


def test_the_cli_choices_are_the_library_s():
    assert cli.EXPORT_DTYPES == tuple(hf_save.DTYPES)
    assert cli.EXPORT_FAMILIES == hf_save.FAMILIES


def test_transformers_loads_the_folder_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    for make_config in (gpt2_config, llama_config):
        model = random_model(make_config())
        out = tmp_path / make_config.__name__
        save_hf_folder(model, str(out))
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
        torch.manual_seed(1)
        idx = torch.randint(0, VOCAB, (2, 13))
        with torch.no_grad():
            torch.testing.assert_close(theirs(idx).logits, model(idx)[0], rtol=1e-4, atol=1e-4)
