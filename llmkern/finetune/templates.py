"""Prompt templates of instruction fine-tuning: how an example {"instruction", "input", "output"} becomes
the prompt a model reads and the response it learns to write.

    alpaca  (the default) "Below is an instruction ...\\n\\n### Instruction:\\n...[### Input:\\n...]### Response:\\n"
    chatml  "<|im_start|>system\\n...<|im_end|>\\n" (only with a system prompt), then
            "<|im_start|>user\\n{instruction}[\\n\\n{input}]<|im_end|>\\n<|im_start|>assistant\\n";
            the response ends with "<|im_end|>"
    plain   "{instruction}[\\n\\n{input}]\\n\\n": for bases that know no chat format

The learned response is the example's output, plus the template's end marker (ChatML's <|im_end|>),
plus end-of-text, which encode_prompt_response appends as a token id for every template.

The markers are ordinary text. llmkern's tokenizers encode all text as ordinary text (tiktoken's
encode_ordinary), so "<|im_start|>" becomes a few ordinary tokens with GPT-2's or any other
tokenizer, even one that has it as a special token, and the same way in training, generation and
judging; text in an instruction that looks like a marker can never turn into a special token.

A run records its template and system prompt in its saved fine-tuning settings (meta["finetune"]);
resolve_prompt_format reads them back, so generation, the win rate and the next recipe prompt the
model the way it was trained; a run without them (pretraining, older runs) means "alpaca".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_TEMPLATE = "alpaca"

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def _alpaca_prompt(instruction: str, input_text: str, system_prompt: str) -> str:
    text = f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}"
    if input_text:
        text += f"\n\n### Input:\n{input_text}"
    return text + "\n\n### Response:\n"


def _chatml_prompt(instruction: str, input_text: str, system_prompt: str) -> str:
    user = f"{instruction}\n\n{input_text}" if input_text else instruction
    system = f"{IM_START}system\n{system_prompt}{IM_END}\n" if system_prompt else ""
    return f"{system}{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"


def _plain_prompt(instruction: str, input_text: str, system_prompt: str) -> str:
    text = f"{instruction}\n\n{input_text}" if input_text else instruction
    return text + "\n\n"


@dataclass(frozen=True)
class Template:
    """A named prompt template: build(instruction, input, system_prompt) -> prompt; response_end is the
    text that closes a response (before end-of-text)."""

    name: str
    build: Callable[[str, str, str], str]
    response_end: str = ""
    takes_system_prompt: bool = False


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("alpaca", _alpaca_prompt),
    Template("chatml", _chatml_prompt, response_end=IM_END, takes_system_prompt=True),
    Template("plain", _plain_prompt),
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

    def prompt(self, example: dict[str, Any]) -> str:
        """The prompt of an example (instruction, optional input); its response follows directly."""
        return get_template(self.template).build(example["instruction"], example.get("input") or "",
                                                 self.system_prompt)

    def response(self, output: str) -> str:
        """The text the model learns after the prompt (end-of-text is appended as a token later)."""
        return output + get_template(self.template).response_end

    @property
    def stop_texts(self) -> tuple[str, ...]:
        """Texts that end a generated response, besides end-of-text."""
        end = get_template(self.template).response_end
        return (end,) if end else ()

    def cut_response(self, text: str) -> str:
        """Generated text up to (without) the first stop text."""
        for stop in self.stop_texts:
            if stop in text:
                text = text[: text.index(stop)]
        return text


def saved_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning settings a checkpoint's meta records ({} when none): SFT and classification keep
    them under meta["finetune"]["settings"], DPO, reward and PPO in meta["finetune"] itself."""
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


def respond(model, tokenizer, prompts: Sequence[str], prompt_format: PromptFormat, max_new_tokens: int,
            temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
            seed: int | None = 0) -> list[str]:
    """The model's response to each prompt (one batch): the decoded new text up to end-of-text or the
    template's stop text, both left out. Each prompt starts with the tokenizer's begin-of-sequence token
    where it has one."""
    from ..data.sequences import encode_prompt
    from ..model import generate

    eot = tokenizer.eot_token
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token=eot,
                   seed=seed, stop=stop_at_texts(tokenizer, prompt_format.stop_texts))
    responses = []
    for prompt_ids, row in zip(ids, out):
        new = row[len(prompt_ids):]
        if eot in new:
            new = new[: new.index(eot)]
        responses.append(prompt_format.cut_response(tokenizer.decode(new)))
    return responses
