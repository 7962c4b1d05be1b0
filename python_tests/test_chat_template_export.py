"""An exported fine-tuned run carries its chat template: each llmkern template as a Jinja chat template, rendered
as transformers renders chat templates, gives exactly the llmkern prompt (and prompt + response) of a
conversation, and the exported tokenizer.json encodes that text to llmkern's ids; tokenizer_config.json gets it
(or keeps the tokenizer's own where that prompts alike), generation_config.json's eos_token_id the end marker."""

import json
import os

import jinja2
import pytest
from bos_tokenizer import BOS_TEXT, train_plain, with_special_tokens
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkern import cli
from llmkern.data.sequences import encode_prompt, encode_text
from llmkern.data.tokenizer import ENDOFTEXT, get_tokenizer
from llmkern.finetune.base import save_finetuned
from llmkern.finetune.templates import TEMPLATES, PromptFormat, trained_prompt_format
from llmkern.model import GPT, GPTConfig, hf_save

# a system prompt that a Jinja string literal must escape: quotes, backslashes, line ends, Jinja's own syntax
TRICKY_SYSTEM = "Be \"brief\" - it's a\\b test.\n\tTabs {{ x }} {% y %} \u00e9\U0001f642\r\nend "
CASES = [(name, system) for name, t in TEMPLATES.items() for system in (("", TRICKY_SYSTEM) if t.takes_system_prompt
                                                                      else ("",))]
QUESTION = "  Name the largest planet.\n"  # surrounding whitespace: stripped where the template strips turns
ANSWER = " Jupiter. \n"
MARKERS = {"alpaca": (), "plain": (), "chatml": ("<|im_start|>", "<|im_end|>"),
           "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
           "phi4-mini": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
           "gemma": ("<start_of_turn>", "<end_of_turn>")}


def render(chat_template: str, messages, add_generation_prompt: bool, **special_tokens) -> str:
    """The text transformers' apply_chat_template renders (its _compile_jinja_template's environment: sandboxed,
    trim_blocks, lstrip_blocks, loop controls, raise_exception; the special tokens as variables)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **special_tokens)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --- the text --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template,system", CASES)
@pytest.mark.parametrize("bos", [False, True])
def test_one_exchange_renders_as_the_llmkern_prompt_and_response(template, system, bos):
    fmt = PromptFormat(template, system)
    chat = fmt.chat_template(bos_token=bos)
    start = BOS_TEXT if bos else ""
    prompt = str(fmt.prompt({"instruction": QUESTION}))
    tokens = {"bos_token": BOS_TEXT, "eos_token": ENDOFTEXT}
    assert render(chat, [user(QUESTION)], True, **tokens) == start + prompt
    assert render(chat, [user(QUESTION), assistant(ANSWER)], False, **tokens) == start + prompt + str(
        fmt.response(ANSWER))
    if fmt.stop_texts:  # the end marker closes the answer, nothing after it
        assert render(chat, [user(QUESTION), assistant(ANSWER)], False).endswith(fmt.stop_texts[0])
    if TEMPLATES[template].takes_system_prompt:  # a system message of the conversation's own replaces the run's
        other = PromptFormat(template, "Answer in French.")
        assert render(chat, [{"role": "system", "content": "Answer in French."}, user(QUESTION)], True,
                      **tokens) == start + str(other.prompt({"instruction": QUESTION}))


# Later turns, as the families' own templates write them (the run's system prompt first)
MULTI_TURN = {
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
              "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ1"
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "phi3": "<|system|>\nS<|end|>\n<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\n",
    "phi4-mini": "<|system|>S<|end|><|user|>Q1<|end|><|assistant|>A1<|end|><|user|>Q2<|end|><|assistant|>",
    "gemma": "<start_of_turn>user\nS\n\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n<start_of_turn>user\n"
             "Q2<end_of_turn>\n<start_of_turn>model\n",
    "plain": "Q1\n\nA1\n\nQ2\n\n",
}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_later_turns_follow_the_family_s_template(template):
    system = "S" if TEMPLATES[template].takes_system_prompt else ""
    chat = PromptFormat(template, system).chat_template(bos_token=False)
    rendered = render(chat, [user("Q1"), assistant("A1"), user("Q2")], True)
    if template == "alpaca":  # the single-turn layout, once per exchange
        first = str(PromptFormat("alpaca").prompt({"instruction": "Q1"}))
        assert rendered == first + "A1\n\n" + first.replace("Q1", "Q2")
    else:
        assert rendered == MULTI_TURN[template]


@pytest.mark.parametrize("template,messages,match", [
    ("chatml", [{"role": "tool", "content": "x"}], "roles are system, user and assistant"),
    ("alpaca", [{"role": "system", "content": "x"}, user("Q")], "user and assistant turns only"),
    ("plain", [{"role": "system", "content": "x"}, user("Q")], "user and assistant turns only"),
    ("gemma", [user("Q"), user("Q")], "must alternate"),
    ("gemma", [assistant("A")], "must alternate"),
])
def test_a_conversation_the_template_cannot_write_is_an_error(template, messages, match):
    with pytest.raises(jinja2.exceptions.TemplateError, match=match):
        render(PromptFormat(template).chat_template(bos_token=False), messages, True)


def test_the_library_renders_as_transformers_does():
    from llmkern.finetune.templates import render_chat_template

    # whitespace control, loop controls, {% generation %}, tojson, the special tokens
    chat = ("{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n{{ bos_token }}"
            "{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}")
    messages = [user("é <b>"), assistant("x"), user("not reached")]
    # the line breaks after block tags and the indent before one go (trim_blocks, lstrip_blocks); no HTML escapes
    expected = f"{BOS_TEXT}{json.dumps(messages[0], ensure_ascii=False)}{BOS_TEXT}{json.dumps(messages[1])}"
    assert render_chat_template(chat, messages, False, bos_token=BOS_TEXT) == expected
    with pytest.raises(jinja2.exceptions.TemplateError, match="no"):
        render_chat_template("{{ raise_exception('no') }}", [], False)


# --- the ids ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    return train_plain(tmp_path_factory.mktemp("plain_tokenizer"))


def template_tokenizer(plain_path, folder, template):
    """A tokenizer with the template's markers as special tokens; a begin-of-sequence token for llama3, gemma and
    alpaca (their chat templates must start with it); plain's has none."""
    bos = {"llama3": BOS_TEXT, "gemma": "<bos>", "alpaca": BOS_TEXT}.get(template)
    names = ((bos,) if bos else ()) + MARKERS[template]
    return with_special_tokens(plain_path, str(folder / f"{template}.tiktoken"), names, bos_token=bos)


def exported_tokenizer(folder, spec, fmt):
    tokenizers = pytest.importorskip("tokenizers")
    folder.mkdir()
    assert hf_save.write_tokenizer(str(folder), spec, 64, fmt)[:2] == ["tokenizer.json", "tokenizer_config.json"]
    with open(folder / "tokenizer_config.json", encoding="utf-8") as f:
        config = json.load(f)
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), config


def check_ids(tok, hf_tokenizer, config, fmt):
    """The exported chat template, rendered with the exported special tokens and encoded without adding any (as
    apply_chat_template does), gives llmkern's ids of the prompt, and of prompt + response."""
    tokens = {k: config[k] for k in ("bos_token", "eos_token") if k in config}
    assert config["chat_template"] == fmt.chat_template(bos_token=tok.bos_token is not None)
    prompt = fmt.prompt({"instruction": QUESTION})
    rendered = render(config["chat_template"], [user(QUESTION)], True, **tokens)
    assert hf_tokenizer.encode(rendered, add_special_tokens=False).ids == encode_prompt(tok, prompt)
    rendered = render(config["chat_template"], [user(QUESTION), assistant(ANSWER)], False, **tokens)
    ids = hf_tokenizer.encode(rendered, add_special_tokens=False).ids
    assert ids == encode_prompt(tok, prompt) + encode_text(tok, fmt.response(ANSWER))
    # each marker of the text is its special id, where the tokenizer has one: the test sees what it checks
    markers = [m for m in MARKERS[fmt.template] if tok.special_token(m) is not None]
    assert all(ids.count(tok.special_token(m)) == rendered.count(m) for m in markers)
    assert sum(rendered.count(m) for m in markers) >= (3 if markers else 0)


@pytest.mark.parametrize("template,system", CASES)
def test_the_exported_tokenizer_encodes_the_rendered_text_to_llmkern_s_ids(template, system, plain_tokenizer,
                                                                          tmp_path):
    tok = template_tokenizer(plain_tokenizer, tmp_path, template)
    fmt = PromptFormat(template, system.replace("{", "(").replace("%", "")[:12])
    hf_tokenizer, config = exported_tokenizer(tmp_path / "hf", tok.spec, fmt)
    check_ids(tok, hf_tokenizer, config, fmt)


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_the_byte_tokenizer_s_export_encodes_it_too(template, tmp_path):
    tok = get_tokenizer("bytes")  # the markers are ordinary bytes
    hf_tokenizer, config = exported_tokenizer(tmp_path / "hf", "bytes", PromptFormat(template, "Be brief."))
    assert "bos_token" not in config and not config["chat_template"].startswith("{{ bos_token }}")
    check_ids(tok, hf_tokenizer, config, PromptFormat(template, "Be brief."))


def chatml_tokenizer_json(folder, config: dict, extra_specials=()) -> str:
    """A Hugging Face tokenizer.json whose <|im_start|> and <|im_end|> (and extra_specials) are special tokens,
    with `config` as its tokenizer_config.json (as test_template_special_tokens builds it)."""
    tokenizers = pytest.importorskip("tokenizers")
    from bos_tokenizer import CORPUS

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=[ENDOFTEXT, *MARKERS["chatml"], *extra_specials],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    folder.mkdir()
    (folder / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder / "tokenizer.json")


# A Qwen2.5-Instruct-like template of its own: ChatML turns, its own default system turn
OWN_CHATML = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}"
              "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
              "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_tokenizer_json_with_special_markers_gets_the_template(tmp_path):
    spec = chatml_tokenizer_json(tmp_path / "tok", {"eos_token": ENDOFTEXT, "model_max_length": 99})
    fmt = PromptFormat("chatml", "Be brief.")
    hf_tokenizer, config = exported_tokenizer(tmp_path / "hf", spec, fmt)
    assert config["eos_token"] == ENDOFTEXT and config["model_max_length"] == 99  # the rest kept
    check_ids(get_tokenizer(spec), hf_tokenizer, config, fmt)


@pytest.mark.parametrize("template,system,kept", [
    ("chatml", "", False),  # it would put its own default system turn in, which the run never saw
    ("chatml", "Be brief.", False),  # it would put its own system prompt in, not the run's
    ("chatml", "You are Qwen.", True),
    ("alpaca", "", False),  # another format
    ("phi3", "", False),
])
def test_a_tokenizer_s_own_chat_template_is_kept_where_it_prompts_as_trained(template, system, kept, tmp_path):
    source = {"eos_token": ENDOFTEXT, "chat_template": OWN_CHATML, "extra": [1, 2]}
    spec = chatml_tokenizer_json(tmp_path / "tok", source)
    fmt = PromptFormat(template, system)
    _, config = exported_tokenizer(tmp_path / "hf", spec, fmt)
    chat_template, line = hf_save.chat_template_choice(spec, fmt)
    if kept:
        assert config == source and chat_template is None and "the tokenizer's own" in line
        with open(tmp_path / "tok" / "tokenizer_config.json", "rb") as f, \
                open(tmp_path / "hf" / "tokenizer_config.json", "rb") as g:
            assert f.read() == g.read()
    else:
        assert config == {**source, "chat_template": fmt.chat_template(bos_token=False)} == {
            **source, "chat_template": chat_template}
        assert "in place of the tokenizer's own" in line and repr(template) in line


@pytest.mark.parametrize("writes_bos", [True, False])
def test_an_own_template_without_the_begin_of_sequence_token_is_replaced(writes_bos, tmp_path):
    own = ("{{ bos_token }}" if writes_bos else "") + OWN_CHATML
    source = {"eos_token": ENDOFTEXT, "add_bos_token": True, "bos_token": BOS_TEXT, "chat_template": own}
    spec = chatml_tokenizer_json(tmp_path / "tok", source, extra_specials=[BOS_TEXT])
    assert get_tokenizer(spec).bos_token is not None
    fmt = PromptFormat("chatml", "You are Qwen.")  # the own template's system turn: only the BOS can differ
    chat_template, _ = hf_save.chat_template_choice(spec, fmt)
    assert chat_template == (None if writes_bos else fmt.chat_template(bos_token=True))


def test_a_template_that_fails_to_render_is_replaced(tmp_path):
    broken = {"eos_token": ENDOFTEXT, "chat_template": [{"name": "default", "template": "{{ raise_exception('x') }}"}]}
    spec = chatml_tokenizer_json(tmp_path / "tok", broken)
    assert hf_save.own_chat_template(spec) == "{{ raise_exception('x') }}"
    assert hf_save.chat_template_choice(spec, PromptFormat("chatml"))[0] == PromptFormat("chatml").chat_template(False)


# --- generation ids and the export --------------------------------------------------------------------------

def test_generation_ids_list_the_end_marker_where_it_is_special(plain_tokenizer, tmp_path):
    chat = template_tokenizer(plain_tokenizer, tmp_path, "chatml")
    ime = chat.special_token("<|im_end|>")
    assert hf_save.generation_ids(chat.spec, PromptFormat("chatml")) == {"eos_token_id": [chat.eot_token, ime],
                                                                         "bos_token_id": None}
    assert hf_save.model_ids(hf_save.generation_ids(chat.spec, PromptFormat("chatml")))["eos_token_id"] == chat.eot_token
    # not fine-tuned, no end marker, or one that is no special token: end-of-text alone
    for spec, fmt in ((chat.spec, None), (chat.spec, PromptFormat("alpaca")), ("bytes", PromptFormat("chatml"))):
        assert hf_save.generation_ids(spec, fmt)["eos_token_id"] == get_tokenizer(spec).eot_token
    # an end marker that is end-of-text itself (Qwen2.5-Instruct's <|im_end|>): once
    qwen = with_special_tokens(plain_tokenizer, str(tmp_path / "qwen.tiktoken"), MARKERS["chatml"],
                               eot_token="<|im_end|>")
    assert hf_save.generation_ids(qwen.spec, PromptFormat("chatml"))["eos_token_id"] == qwen.eot_token


def test_only_a_fine_tuned_run_has_a_prompt_format():
    assert trained_prompt_format({"config": {}}) is None
    assert trained_prompt_format({"finetune": {"method": "sft"}}) == PromptFormat("alpaca")  # older runs
    assert trained_prompt_format({"finetune": {"method": "dpo", "template": "gemma", "system_prompt": "S"}}) == \
        PromptFormat("gemma", "S")


def test_a_chatml_sft_run_exports_with_its_chat_template_and_end_marker(plain_tokenizer, shared_data, tmp_path,
                                                                       capsys):
    from test_finetune_sft import instruction_file, sft_config

    from llmkern.finetune.sft import run_sft

    tok = template_tokenizer(plain_tokenizer, tmp_path, "chatml")
    config = GPTConfig.from_preset("tiny", vocab_size=tok.n_vocab, block_size=320, n_layer=1, n_head=2, n_embd=32,
                                   backend="torch")
    base = save_finetuned(str(tmp_path / "base"), 0, GPT(config).state_dict(),
                          {"model_config": config.to_dict(), "tokenizer": tok.spec})
    run = tmp_path / "sft"
    run_sft(sft_config(base, instruction_file(shared_data, tmp_path, n=4), run, max_steps=1, warmup_steps=0,
                       template="chatml", system_prompt="Be brief.", num_samples=1, max_new_tokens=2))
    out = tmp_path / "hf"
    assert cli.main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert "chat template: llmkern's 'chatml' template" in capsys.readouterr().out
    fmt = PromptFormat("chatml", "Be brief.")

    def read(name):
        with open(os.path.join(out, name), encoding="utf-8") as f:
            return json.load(f)

    assert read("tokenizer_config.json")["chat_template"] == fmt.chat_template(bos_token=False)
    assert read("generation_config.json") == {"bos_token_id": None,
                                              "eos_token_id": [tok.eot_token, tok.special_token("<|im_end|>")]}
    assert read("config.json")["eos_token_id"] == tok.eot_token
    tokenizers = pytest.importorskip("tokenizers")
    hf_tokenizer = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    check_ids(tok, hf_tokenizer, read("tokenizer_config.json"), fmt)
    # a run not fine-tuned (the base): no chat template, end-of-text alone
    assert cli.main(["export", "--run", base, "--out", str(tmp_path / "base-hf")]) == 0
    assert "chat template" not in capsys.readouterr().out
    with open(tmp_path / "base-hf" / "tokenizer_config.json", encoding="utf-8") as f:
        assert "chat_template" not in json.load(f)


@pytest.mark.parametrize("template,system", CASES)
def test_transformers_applies_the_exported_chat_template(template, system, plain_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = template_tokenizer(plain_tokenizer, tmp_path, template)  # llama3's, gemma's: a BOS, not to be doubled
    fmt = PromptFormat(template, system)
    exported_tokenizer(tmp_path / "hf", tok.spec, fmt)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    prompt = fmt.prompt({"instruction": QUESTION})
    ids = theirs.apply_chat_template([user(QUESTION)], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == encode_prompt(tok, prompt)
    text = theirs.apply_chat_template([user(QUESTION), assistant(ANSWER)], tokenize=False)
    start = theirs.bos_token if tok.bos_token is not None else ""
    assert text == start + prompt + fmt.response(ANSWER)
