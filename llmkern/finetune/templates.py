"""Prompt templates of instruction fine-tuning: how an example {"instruction", "input", "output"} becomes
the prompt a model reads and the response it learns to write.

    alpaca  (the default) "Below is an instruction ...\\n\\n### Instruction:\\n...[### Input:\\n...]### Response:\\n"
    chatml  "<|im_start|>system\\n...<|im_end|>\\n" (only with a system prompt), then
            "<|im_start|>user\\n{instruction}[\\n\\n{input}]<|im_end|>\\n<|im_start|>assistant\\n";
            the response ends with "<|im_end|>" (Qwen2.5's and Qwen3's chat format; Qwen2.5-Instruct's own
            template puts in a default system turn, "You are Qwen, created by Alibaba Cloud. You are a helpful
            assistant.", where a conversation has none: give it as system_prompt to prompt such a model as it
            was trained)
    llama3  "<|start_header_id|>system<|end_header_id|>\\n\\n...<|eot_id|>" (only with a system prompt), then
            "<|start_header_id|>user<|end_header_id|>\\n\\n{instruction}[\\n\\n{input}]<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\\n\\n"; the response ends with "<|eot_id|>"
            (Llama 3's chat format; its <|begin_of_text|> is the tokenizer's begin-of-sequence token, which every
            sequence starts with: llmkern.data.sequences); each turn's text stripped, as Llama 3's template does
    phi3    "<|system|>\\n...<|end|>\\n" (only with a system prompt), then
            "<|user|>\\n{instruction}[\\n\\n{input}]<|end|>\\n<|assistant|>\\n"; the response ends with
            "<|end|>" (Phi-3's and Phi-3.5's chat format)
    phi4-mini  the same turns with no line breaks: "<|user|>{instruction}[\\n\\n{input}]<|end|><|assistant|>"
            (Phi-4-mini's chat format)
    gemma   "<start_of_turn>user\\n[{system_prompt}\\n\\n]{instruction}[\\n\\n{input}]<end_of_turn>\\n"
            "<start_of_turn>model\\n"; the response ends with "<end_of_turn>" (Gemma 2's and Gemma 3's chat
            format; Gemma has no system role: its template puts the system prompt, with "\\n\\n", in front of the
            first user turn's text, as here. Its <bos> is the tokenizer's begin-of-sequence token; each turn's
            text stripped, as Gemma's template does, the system prompt not; the "\\n" its template writes after
            <end_of_turn> starts the next turn, which generation never reaches: not learned)
    plain   "{instruction}[\\n\\n{input}]\\n\\n": for bases that know no chat format

The learned response is the example's output, plus the template's end marker (<|im_end|>, <|eot_id|>,
<end_of_turn>), plus end-of-text, which encode_prompt_response appends as a token id for every template (once: not
after an end marker that is the tokenizer's end-of-text token itself, as <|im_end|> is Qwen2.5-Instruct's).

The markers (<|im_start|>, <|im_end|>, <|start_header_id|>, ...) are the tokenizer's special tokens of those
names where it has them (tokenizer.special_token: an imported Qwen, Llama 3 or Gemma tokenizer), so that an instruct-
capable base is trained and prompted with the ids it knows; with any other tokenizer (GPT-2's, "bytes", one
trained by llmkern) they are ordinary text, a few ordinary tokens each. Text that comes from the user (the
instruction, the input, the system prompt, the output) is always ordinary text, even where it spells a marker:
a template builds its prompt from pieces, each a Marker or text (a TemplateText: a str that keeps its pieces), and
llmkern.data.sequences.encode_text turns only the Marker pieces into special tokens. Generation stops at the end
marker: at its token id where it is a special token, else where its text appears.

A run records its template and system prompt in its saved fine-tuning settings (meta["finetune"]);
resolve_prompt_format reads them back, so generation, the win rate and the next recipe prompt the
model the way it was trained; a run without them (pretraining, older runs) means "alpaca".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..data.sequences import Marker, TemplateText

DEFAULT_TEMPLATE = "alpaca"

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
START_HEADER, END_HEADER, EOT_ID = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
PHI_SYSTEM, PHI_USER, PHI_ASSISTANT, PHI_END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

Pieces = list[str | Marker]  # what a template builds: ordinary text and markers, in order


def _user_text(instruction: str, input_text: str) -> str:
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def _alpaca_prompt(instruction: str, input_text: str, system_prompt: str) -> Pieces:
    text = f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}"
    if input_text:
        text += f"\n\n### Input:\n{input_text}"
    return [text + "\n\n### Response:\n"]


def _chatml_turn(role: str, text: str) -> Pieces:
    return [Marker(IM_START), f"{role}\n", text, Marker(IM_END), "\n"]


def _chatml_prompt(instruction: str, input_text: str, system_prompt: str) -> Pieces:
    system = _chatml_turn("system", system_prompt) if system_prompt else []
    return [*system, *_chatml_turn("user", _user_text(instruction, input_text)), Marker(IM_START), "assistant\n"]


def _llama3_header(role: str) -> Pieces:
    return [Marker(START_HEADER), role, Marker(END_HEADER), "\n\n"]


def _llama3_prompt(instruction: str, input_text: str, system_prompt: str) -> Pieces:
    # each turn's text stripped, as Llama 3's own chat template does (its "| trim")
    system = [*_llama3_header("system"), system_prompt.strip(), Marker(EOT_ID)] if system_prompt else []
    user = [*_llama3_header("user"), _user_text(instruction, input_text).strip(), Marker(EOT_ID)]
    return [*system, *user, *_llama3_header("assistant")]


def _phi_prompt(line_break: str) -> Callable[[str, str, str], Pieces]:
    """The Phi chat format's prompt builder: each turn its role's marker, the text, <|end|>; Phi-3 puts a line
    break after each marker and each turn ("\\n"), Phi-4-mini none ("")."""
    breaks = [line_break] if line_break else []  # no empty pieces

    def turn(marker: str, text: str) -> Pieces:
        return [Marker(marker), line_break + text, Marker(PHI_END), *breaks]

    def build(instruction: str, input_text: str, system_prompt: str) -> Pieces:
        system = turn(PHI_SYSTEM, system_prompt) if system_prompt else []
        return [*system, *turn(PHI_USER, _user_text(instruction, input_text)), Marker(PHI_ASSISTANT), *breaks]

    return build


def _gemma_prompt(instruction: str, input_text: str, system_prompt: str) -> Pieces:
    # Gemma has no system role: its chat template puts the system prompt (not stripped) and "\n\n" in front of
    # the first user turn's text (stripped: its "| trim")
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    user = prefix + _user_text(instruction, input_text).strip()
    return [Marker(START_OF_TURN), f"user\n{user}", Marker(END_OF_TURN), "\n", Marker(START_OF_TURN), "model\n"]


def _plain_prompt(instruction: str, input_text: str, system_prompt: str) -> Pieces:
    return [_user_text(instruction, input_text) + "\n\n"]


# --- chat templates: each llmkern template as a Jinja chat template (tokenizer_config.json's "chat_template") ---
#
# Each renders a `messages` list ({"role": "system" | "user" | "assistant", "content": str}) the way its
# Template builds prompts: [system?] + one user message with add_generation_prompt is the prompt of
# {"instruction": content} (the run's system prompt, written into the template, is the system turn where messages
# has none), and an assistant message after it adds PromptFormat.response(content). Later turns follow the model
# family's own template; the line break those write after a turn's end marker is written before the next turn
# instead, as the Templates do: a conversation ending in an assistant turn ends at its end marker, as the model
# learned it. alpaca and plain repeat their single-turn layout per exchange, "\n\n" between an answer and the next
# instruction. Hugging Face (transformers' apply_chat_template, vLLM) renders them with trim_blocks and
# lstrip_blocks: these hold no whitespace outside their expressions, so that changes nothing.

_ROLES_CHECK = ("{% if message['role'] not in ['system', 'user', 'assistant'] %}"
                "{{ raise_exception('roles are system, user and assistant; got ' + message['role']) }}{% endif %}")


def _jinja_string(text: str) -> str:
    """text as a Jinja string literal. Jinja reads a literal's escapes as Python's unicode-escape does and turns
    the line ends in it into "\\n": so quotes, backslashes and control characters are escaped; other characters
    stay as they are."""
    escaped = "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else "\\" + c if c in "'\\" else c
                      for c in text)
    return f"'{escaped}'"


def _default_system_turn(system_prompt: str) -> str:
    """Jinja that puts the run's system prompt as a system turn in front of messages that start without one."""
    if not system_prompt:
        return ""
    return ("{% if not messages or messages[0]['role'] != 'system' %}"
            f"{{% set messages = [{{'role': 'system', 'content': {_jinja_string(system_prompt)}}}] + messages %}}"
            "{% endif %}")


def _single_turn_chat_template(name: str, user_turn: str) -> str:
    """alpaca's and plain's chat template: each user message as the prompt (the Jinja expression user_turn, of
    `message`), each assistant message its text; "\\n\\n" between an answer and the next instruction. They have
    no system turn: a system message is an error, not left out unseen."""
    return ("{% for message in messages %}"
            "{% if message['role'] == 'user' %}"
            "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
            f"{{{{ {user_turn} }}}}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] }}"
            f"{{% else %}}{{{{ raise_exception('the {name} template has user and assistant turns only; got ' + "
            "message['role']) }}"
            "{% endif %}{% endfor %}")


def _alpaca_chat_template(system_prompt: str) -> str:
    header = _jinja_string(f"{ALPACA_HEADER}\n\n### Instruction:\n")
    return _single_turn_chat_template("alpaca", f"{header} + message['content'] + '\\n\\n### Response:\\n'")


def _plain_chat_template(system_prompt: str) -> str:
    return _single_turn_chat_template("plain", "message['content'] + '\\n\\n'")


def _chatml_chat_template(system_prompt: str) -> str:
    # Qwen2.5's and Qwen3's turns, without their default system turn unless it is the run's
    return (_default_system_turn(system_prompt)
            + "{% for message in messages %}" + _ROLES_CHECK
            + "{% if not loop.first %}{{ '\\n' }}{% endif %}"
            f"{{{{ '{IM_START}' + message['role'] + '\\n' + message['content'] + '{IM_END}' }}}}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{{% if messages %}}{{{{ '\\n' }}}}{{% endif %}}"
            f"{{{{ '{IM_START}assistant\\n' }}}}{{% endif %}}")


def _llama3_chat_template(system_prompt: str) -> str:
    # Llama 3's turns, each text trimmed; no line break between turns
    return (_default_system_turn(system_prompt)
            + "{% for message in messages %}" + _ROLES_CHECK
            + f"{{{{ '{START_HEADER}' + message['role'] + '{END_HEADER}\\n\\n' + message['content'] | trim + "
            f"'{EOT_ID}' }}}}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ '{START_HEADER}assistant{END_HEADER}\\n\\n' }}}}{{% endif %}}")


def _phi_chat_template(line_break: str) -> Callable[[str], str]:
    """The Phi chat format's chat template: "<|role|>", the text, <|end|>, a line break after each marker and
    between turns for Phi-3 ("\\n"), none for Phi-4-mini (""). Unlike Phi's own, no end-of-text after a
    conversation rendered without a generation prompt: the run learned end-of-text as a token after <|end|>."""
    brk = _jinja_string(line_break)

    def chat_template(system_prompt: str) -> str:
        return (_default_system_turn(system_prompt)
                + "{% for message in messages %}" + _ROLES_CHECK
                + f"{{% if not loop.first %}}{{{{ {brk} }}}}{{% endif %}}"
                f"{{{{ '<|' + message['role'] + '|>' + {brk} + message['content'] + '{PHI_END}' }}}}"
                "{% endfor %}"
                f"{{% if add_generation_prompt %}}{{% if messages %}}{{{{ {brk} }}}}{{% endif %}}"
                f"{{{{ '{PHI_ASSISTANT}' + {brk} }}}}{{% endif %}}")

    return chat_template


def _gemma_chat_template(system_prompt: str) -> str:
    # Gemma's turns: no system role (a system message's text, else the run's system prompt, and "\n\n" go in front
    # of the first user turn's trimmed text), user and model turns alternating, as its own template demands
    return ("{% if messages and messages[0]['role'] == 'system' %}"
            "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
            f"{{% else %}}{{% set system = {_jinja_string(system_prompt)} %}}{{% set turns = messages %}}{{% endif %}}"
            "{% for message in turns %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) or message['role'] not in ['user', "
            "'assistant'] %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/..."
            " after one system message at most') }}{% endif %}"
            "{% if not loop.first %}{{ '\\n' }}{% endif %}"
            f"{{{{ '{START_OF_TURN}' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' + "
            "(system + '\\n\\n' if loop.first and system else '') + message['content'] | trim + "
            f"'{END_OF_TURN}' }}}}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{{% if turns %}}{{{{ '\\n' }}}}{{% endif %}}"
            f"{{{{ '{START_OF_TURN}model\\n' }}}}{{% endif %}}")


def render_chat_template(chat_template: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                         **variables: Any) -> str:
    """A chat template's text for messages, rendered as transformers' apply_chat_template renders it: a sandbox
    that allows no changes to the messages, trim_blocks and lstrip_blocks, the raise_exception, tojson and
    strftime_now helpers, loop controls and a {% generation %} block; variables are the tokenizer's special tokens
    (bos_token, eos_token, ...). A jinja2.TemplateError (from raise_exception too) where it cannot."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """{% generation %}...{% endgeneration %}: transformers marks the assistant's text with it; its text."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' own: Jinja's escapes HTML characters
        import json

        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(chat_template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                 **variables)


@dataclass(frozen=True)
class Template:
    """A named prompt template: build(instruction, input, system_prompt) -> the prompt's pieces (ordinary text
    and Markers); chat_template(system_prompt) -> the same format as a Jinja chat template of messages, the
    system prompt its default system turn (see "chat templates" above); response_end is the marker that closes a response (before end-of-text), "" for none;
    strips_turns: each turn's text (the response too) is stripped of surrounding whitespace, as the model
    family's own chat template does, so that fine-tuning sees what the model's users will send it."""

    name: str
    build: Callable[[str, str, str], Pieces]
    chat_template: Callable[[str], str]
    response_end: str = ""
    takes_system_prompt: bool = False
    strips_turns: bool = False


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("alpaca", _alpaca_prompt, _alpaca_chat_template),
    Template("chatml", _chatml_prompt, _chatml_chat_template, response_end=IM_END, takes_system_prompt=True),
    Template("plain", _plain_prompt, _plain_chat_template),
    Template("llama3", _llama3_prompt, _llama3_chat_template, response_end=EOT_ID, takes_system_prompt=True,
             strips_turns=True),
    Template("phi3", _phi_prompt("\n"), _phi_chat_template("\n"), response_end=PHI_END, takes_system_prompt=True),
    Template("phi4-mini", _phi_prompt(""), _phi_chat_template(""), response_end=PHI_END, takes_system_prompt=True),
    Template("gemma", _gemma_prompt, _gemma_chat_template, response_end=END_OF_TURN, takes_system_prompt=True,
             strips_turns=True),
)}


def get_template(name: str) -> Template:
    """The template called `name`; a ValueError listing the names for any other."""
    if not isinstance(name, str) or name not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {name!r}")
    return TEMPLATES[name]


def check_template_settings(template: str, system_prompt: str) -> None:
    """A ValueError unless template names a template and system_prompt (a string) is empty or the
    template has a system turn."""
    chosen = get_template(template)
    if not isinstance(system_prompt, str):
        raise ValueError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
    if system_prompt and not chosen.takes_system_prompt:
        takes = [t.name for t in TEMPLATES.values() if t.takes_system_prompt]
        raise ValueError(f"system_prompt is only used by the {', '.join(takes)} template; template "
                         f"{template!r} has no system turn")


@dataclass(frozen=True)
class PromptFormat:
    """A template with its settings: what turns examples into prompts and responses, and where a
    generated response ends."""

    template: str = DEFAULT_TEMPLATE
    system_prompt: str = ""

    def __post_init__(self) -> None:
        check_template_settings(self.template, self.system_prompt)

    def prompt(self, example: dict[str, Any]) -> TemplateText:
        """The prompt of an example (instruction, optional input); its response follows directly. A str that
        keeps its pieces: encode_text (encode_sequence, encode_prompt) puts the markers in as special tokens
        where the tokenizer has them."""
        return TemplateText(get_template(self.template).build(example["instruction"], example.get("input") or "",
                                                              self.system_prompt))

    def response(self, output: str) -> TemplateText:
        """The text the model learns after the prompt, ended by the template's end marker (end-of-text is
        appended as a token later)."""
        template = get_template(self.template)
        if template.strips_turns:
            output = output.strip()
        end = template.response_end
        return TemplateText([output, Marker(end)] if end else [output])

    def chat_template(self, bos_token: bool) -> str:
        """The format as a Jinja chat template (tokenizer_config.json's "chat_template"), the system prompt its
        default system turn. bos_token: whether the tokenizer's begin-of-sequence token starts every sequence
        (llmkern.data.sequences.sequence_start): then the template starts with {{ bos_token }}, as the families'
        own do, since Hugging Face's apply_chat_template and vLLM encode the rendered text without adding
        special tokens."""
        body = get_template(self.template).chat_template(self.system_prompt)
        return "{{ bos_token }}" + body if bos_token else body

    @property
    def stop_texts(self) -> tuple[str, ...]:
        """Texts that end a generated response, besides end-of-text."""
        end = get_template(self.template).response_end
        return (end,) if end else ()

    def stop_token_ids(self, tokenizer) -> tuple[int, ...]:
        """The ids of the stop texts that `tokenizer` has as special tokens: with it, a response ends at them."""
        ids = (tokenizer.special_token(text) for text in self.stop_texts)
        return tuple(i for i in ids if i is not None)

    def ordinary_stop_texts(self, tokenizer) -> tuple[str, ...]:
        """The stop texts that `tokenizer` has no special token for: with it, a response ends where they appear."""
        return tuple(text for text in self.stop_texts if tokenizer.special_token(text) is None)

    def cut_response(self, text: str) -> str:
        """Generated text up to (without) the first stop text."""
        return cut_at_texts(text, self.stop_texts)


def cut_at_texts(text: str, texts: Sequence[str]) -> str:
    """text up to (without) the first of `texts` in it."""
    for stop in texts:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def saved_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning settings a checkpoint's meta records ({} when none): SFT and classification keep
    them under meta["finetune"]["settings"], DPO, reward, PPO and GRPO in meta["finetune"] itself."""
    finetune = meta.get("finetune") if isinstance(meta, dict) else None
    if not isinstance(finetune, dict):
        return {}
    settings = finetune.get("settings", finetune)
    return settings if isinstance(settings, dict) else {}


def saved_prompt_format(meta: dict[str, Any]) -> PromptFormat:
    """The prompt format a run was fine-tuned with; alpaca for a run that records none."""
    settings = saved_settings(meta)
    template = settings.get("template") or DEFAULT_TEMPLATE
    system_prompt = settings.get("system_prompt") or ""
    try:
        return PromptFormat(template, system_prompt)
    except ValueError as err:
        raise ValueError(f"the checkpoint's saved prompt template is not usable: {err}") from err


def trained_prompt_format(meta: dict[str, Any]) -> PromptFormat | None:
    """The prompt format a fine-tuned run (its checkpoint meta records a "finetune" section) was trained with;
    None for a run that was not fine-tuned (pretraining), which knows no prompt format."""
    return saved_prompt_format(meta) if isinstance(meta.get("finetune"), dict) else None


def resolve_prompt_format(meta: dict[str, Any], template: str | None = None,
                          system_prompt: str | None = None) -> PromptFormat:
    """The prompt format for a model whose checkpoint meta is `meta`: the run's own (saved_prompt_format)
    unless template names another. system_prompt, when given (not None and not ""), replaces the
    system prompt; otherwise the run's is kept as long as its template is the one used."""
    saved = saved_prompt_format(meta)
    chosen = template or saved.template
    if system_prompt:
        return PromptFormat(chosen, system_prompt)
    return PromptFormat(chosen, saved.system_prompt if chosen == saved.template else "")


def settle_template(config, base_meta: dict[str, Any]):
    """(config with its template and system_prompt resolved against the base run, its PromptFormat):
    a recipe saves the resolved config, so that the next command reads what the model learned."""
    import dataclasses

    fmt = resolve_prompt_format(base_meta, config.template, config.system_prompt)
    return dataclasses.replace(config, template=fmt.template, system_prompt=fmt.system_prompt), fmt


# --- generation -------------------------------------------------------------------------------------

def stop_at_texts(tokenizer, texts: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """For generate(stop=...): true once a row's new tokens contain one of `texts` (None when no texts).
    Each check decodes only the tail that can hold a stop text: every token is at least one byte."""
    texts = [t for t in texts if t]
    if not texts:
        return None
    tail = max(len(t.encode("utf-8")) for t in texts)

    def stop(new_tokens: list[int]) -> bool:
        recent = tokenizer.decode(new_tokens[-tail:])
        return any(t in recent for t in texts)

    return stop


def stop_at_tokens(token_ids: Sequence[int]) -> Callable[[list[int]], bool] | None:
    """For generate(stop=...): true once a row's last new token is one of token_ids (None when there are none)."""
    ids = frozenset(token_ids)
    if not ids:
        return None

    def stop(new_tokens: list[int]) -> bool:
        return bool(new_tokens) and new_tokens[-1] in ids

    return stop


def response_stop(tokenizer, prompt_format: PromptFormat) -> Callable[[list[int]], bool] | None:
    """For generate(stop=...): the template's end marker, at its token id where the tokenizer has it as a special
    token, else where its text appears; None for a template without one."""
    by_id = stop_at_tokens(prompt_format.stop_token_ids(tokenizer))
    by_text = stop_at_texts(tokenizer, prompt_format.ordinary_stop_texts(tokenizer))
    if by_id is None or by_text is None:
        return by_id or by_text
    return lambda new_tokens: by_id(new_tokens) or by_text(new_tokens)


def cut_at_tokens(ids: Sequence[int], token_ids: Sequence[int]) -> list[int]:
    """ids up to (without) the first of token_ids in them."""
    ends = set(token_ids)
    return next((list(ids[:i]) for i, t in enumerate(ids) if t in ends), list(ids))


def respond(model, tokenizer, prompts: Sequence[str], prompt_format: PromptFormat, max_new_tokens: int,
            temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
            seed: int | None = 0, first_row: int = 0) -> list[str]:
    """The model's response to each prompt (one batch; first_row: its first prompt's index among a larger set
    sampled a batch at a time, as generate's): the decoded new text up to end-of-text or the
    template's end marker (its special token where the tokenizer has one, else its text), both left out. Each
    prompt (a PromptFormat.prompt, whose markers become special tokens where the tokenizer has them) starts with
    the tokenizer's begin-of-sequence token where it has one, which the model keeps reading where a prompt and
    its response outgrow block_size."""
    from ..data.sequences import encode_prompt, sequence_start
    from ..model import generate

    ends = (tokenizer.eot_token, *prompt_format.stop_token_ids(tokenizer))
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_token=tokenizer.eot_token, seed=seed, stop=response_stop(tokenizer, prompt_format),
                   keep_first=len(sequence_start(tokenizer)), first_row=first_row)
    responses = []
    for prompt_ids, row in zip(ids, out):
        new = cut_at_tokens(row[len(prompt_ids):], ends)
        responses.append(cut_at_texts(tokenizer.decode(new), prompt_format.ordinary_stop_texts(tokenizer)))
    return responses
