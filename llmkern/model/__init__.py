"""The GPT model: its config, the module, KV-cached generation, Hugging Face GPT-2, Llama-family, Phi-3, Gemma 2 and
Gemma 3 weights in, and out as a Hugging Face model folder (save_hf_folder)."""

from .config import PRESETS, GPTConfig
from .generate import generate
from .gpt import GPT
from .hf import (
    from_hf_gemma2,
    from_hf_gemma3,
    from_hf_gpt2,
    from_hf_llama,
    from_hf_phi3,
    load_hf_file,
    to_hf_gemma2,
    to_hf_gemma3,
    to_hf_gpt2,
    to_hf_llama,
    to_hf_phi3,
)
from .hf_save import save_hf_folder

__all__ = ["GPT", "PRESETS", "GPTConfig", "from_hf_gemma2", "from_hf_gemma3", "from_hf_gpt2", "from_hf_llama",
           "from_hf_phi3", "generate", "load_hf_file", "save_hf_folder", "to_hf_gemma2", "to_hf_gemma3", "to_hf_gpt2",
           "to_hf_llama", "to_hf_phi3"]
