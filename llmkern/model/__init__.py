"""The GPT model: its config, the module, KV-cached generation, Hugging Face GPT-2 weights."""

from .config import PRESETS, GPTConfig
from .generate import generate
from .gpt import GPT
from .hf import from_hf_gpt2, to_hf_gpt2

__all__ = ["GPT", "GPTConfig", "PRESETS", "from_hf_gpt2", "generate", "to_hf_gpt2"]
