"""Tokenizers with the same ordinary tokens, made without network: a small BPE trained by llmkern (no
begin-of-sequence token, as GPT-2's) and copies of it whose sidecars add special tokens: one adds
"<|begin_of_text|>" and names it "bos_token", as an imported Llama 3 tokenizer's does (make_tokenizers); others
add a chat format's markers (with_special_tokens)."""

import json
import shutil

from llmkern.data.bpe import train_bpe
from llmkern.data.tokenizer import get_tokenizer, sidecar_path

BOS_TEXT = "<|begin_of_text|>"
CORPUS = ["the cat sees the moon. the dog eats bread; a bird sings over the hill and the river. " * 8]


def train_plain(folder) -> str:
    """The path of a small BPE trained by llmkern in `folder` (its one special token: <|endoftext|>)."""
    path = str(folder / "plain.tiktoken")
    train_bpe(CORPUS, 300, path, num_workers=1)
    return path


def with_special_tokens(plain_path: str, out_path: str, names, bos_token: str | None = None,
                        eot_token: str | None = None):
    """A copy of the tokenizer at plain_path, written at out_path, whose sidecar adds the special tokens `names`
    at the next free ids, in order (and names its begin-of-sequence and end-of-text tokens where given)."""
    shutil.copyfile(plain_path, out_path)
    with open(sidecar_path(plain_path), encoding="utf-8") as f:
        meta = json.load(f)  # its "tiktoken_sha256" still matches: the ranks are copied unchanged
    for name in names:
        meta["special_tokens"][name] = max(meta["special_tokens"].values()) + 1
    if bos_token is not None:
        meta["bos_token"] = bos_token
    if eot_token is not None:
        meta["eot_token"] = eot_token
    with open(sidecar_path(out_path), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return get_tokenizer(out_path)


def make_tokenizers(folder) -> tuple:
    """(tokenizer without a BOS, tokenizer with one) written in `folder`."""
    plain_path = train_plain(folder)
    with_bos = with_special_tokens(plain_path, str(folder / "bos.tiktoken"), [BOS_TEXT], bos_token=BOS_TEXT)
    plain = get_tokenizer(plain_path)
    assert plain.bos_token is None and with_bos.bos_token == with_bos.n_vocab - 1
    return plain, with_bos
