"""Two tokenizers with the same ordinary tokens, made without network: a small BPE trained by llmkern (no
begin-of-sequence token, as GPT-2's) and a copy of it whose sidecar adds "<|begin_of_text|>" and names it
"bos_token", as an imported Llama 3 tokenizer's does."""

import json
import shutil

from llmkern.data.bpe import train_bpe
from llmkern.data.tokenizer import get_tokenizer, sidecar_path

BOS_TEXT = "<|begin_of_text|>"
CORPUS = ["the cat sees the moon. the dog eats bread; a bird sings over the hill and the river. " * 8]


def make_tokenizers(folder) -> tuple:
    """(tokenizer without a BOS, tokenizer with one) written in `folder`."""
    plain_path = str(folder / "plain.tiktoken")
    bos_path = str(folder / "bos.tiktoken")
    train_bpe(CORPUS, 300, plain_path, num_workers=1)
    shutil.copyfile(plain_path, bos_path)
    with open(sidecar_path(plain_path), encoding="utf-8") as f:
        meta = json.load(f)  # its "tiktoken_sha256" still matches: the ranks are copied unchanged
    meta["special_tokens"][BOS_TEXT] = max(meta["special_tokens"].values()) + 1
    meta["bos_token"] = BOS_TEXT
    with open(sidecar_path(bos_path), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    plain, with_bos = get_tokenizer(plain_path), get_tokenizer(bos_path)
    assert plain.bos_token is None and with_bos.bos_token == with_bos.n_vocab - 1
    return plain, with_bos
