"""The GPT model: its config, the module, KV-cached generation, Hugging Face GPT-2 and Llama weights."""

from .config import PRESETS, GPTConfig
from .generate import generate
from .gpt import GPT
from .hf import from_hf_gpt2, from_hf_llama, load_hf_file, to_hf_gpt2, to_hf_llama

__all__ = ["GPT", "GPTConfig", "PRESETS", "from_hf_gpt2", "from_hf_llama", "generate", "load_hf_file", "to_hf_gpt2",
           "to_hf_llama"]
