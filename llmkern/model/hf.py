"""Hugging Face weights in and out (no download, no transformers import): load_hf_file picks the importer by the
config.json beside a model.safetensors file, and every importer's public name is re-exported here.

The pieces, one job each:
    hf_common        reading a model's files (config.json, safetensors shards) and checked copies
    hf_gpt2          GPT-2's weights (Conv1D layouts, the head count from config.json)
    hf_llama_config  a Llama-family config.json (Llama, Mistral, Qwen2, Qwen3, Phi-3; Mixtral, Qwen3-MoE) <-> GPTConfig
    hf_llama         a Llama-family model's weights (Mixtral's and Qwen3-MoE's experts too), in and out
    hf_phi3          Phi-3's weights (Llama's model, q/k/v and gate/up fused), in and out
    hf_gemma3_config a Gemma 3 text config.json (Gemma3ForCausalLM's, or a multimodal one's text_config), or a Gemma 2
                     one (Gemma2ForCausalLM's) <-> GPTConfig
    hf_gemma3        Gemma 3's text weights (the multimodal checkpoints' text part too) and Gemma 2's, in and out
    hf_save          a GPT written out as a whole Hugging Face model folder by the exporters above (`llmkern export`;
                     save_hf_folder, in llmkern.model)
"""

from __future__ import annotations

from .gpt import GPT
from .hf_common import check_model_file, read_hf_config
from .hf_gemma3 import (
    from_hf_gemma2,
    from_hf_gemma3,
    load_hf_gemma2,
    load_hf_gemma2_file,
    load_hf_gemma3,
    load_hf_gemma3_file,
    to_hf_gemma2,
    to_hf_gemma3,
)
from .hf_gemma3_config import (
    GEMMA2_TYPE,
    GEMMA3_TYPES,
    config_from_hf_gemma2,
    config_from_hf_gemma3,
    hf_gemma2_config,
    hf_gemma3_config,
)
from .hf_gpt2 import (
    config_from_hf_gpt2,
    from_hf_gpt2,
    hf_gpt2_config,
    load_hf_gpt2,
    load_hf_gpt2_file,
    to_hf_gpt2,
)
from .hf_llama import from_hf_llama, load_hf_llama, load_hf_llama_file, to_hf_llama
from .hf_llama_config import (
    LLAMA_TYPES,
    MOE_TYPES,
    PHI3_TYPE,
    check_no_unsupported_moe,
    config_from_hf_llama,
    config_from_hf_phi3,
    hf_llama_config,
    hf_phi3_config,
)
from .hf_phi3 import from_hf_phi3, load_hf_phi3, load_hf_phi3_file, to_hf_phi3

__all__ = [
    "GEMMA2_TYPE", "GEMMA3_TYPES", "LLAMA_TYPES", "MOE_TYPES", "PHI3_TYPE", "config_from_hf_gemma2",
    "config_from_hf_gemma3", "config_from_hf_gpt2", "config_from_hf_llama", "config_from_hf_phi3", "from_hf_gemma2",
    "from_hf_gemma3", "from_hf_gpt2", "from_hf_llama", "from_hf_phi3", "hf_gemma2_config", "hf_gemma3_config",
    "hf_gpt2_config", "hf_llama_config", "hf_phi3_config", "load_hf_file", "load_hf_gemma2", "load_hf_gemma2_file",
    "load_hf_gemma3", "load_hf_gemma3_file", "load_hf_gpt2", "load_hf_gpt2_file", "load_hf_llama",
    "load_hf_llama_file", "load_hf_phi3", "load_hf_phi3_file", "read_hf_config", "to_hf_gemma2", "to_hf_gemma3",
    "to_hf_gpt2", "to_hf_llama", "to_hf_phi3",
]
# Other Gemma generations, which a Gemma 2 or 3 importer would misread: what each has that the model here does not
_OTHER_GEMMAS = {
    "gemma": "Gemma 1's model (no QK-norm nor sandwich norms; GeGLU of exact GELU in some of its configs)",
}


def load_hf_file(path: str, **overrides) -> tuple[GPT, str]:
    """(GPT, model_type) of a Hugging Face model.safetensors file (or shard, or model.safetensors.index.json): by the
    model_type of the config.json beside it, GPT-2's (also when there is no config.json: see load_hf_gpt2_file),
    Llama's (Mixtral's and Qwen3-MoE's too), Phi-3's, Gemma 2's or Gemma 3's (text). Another mixture-of-experts model
    is refused, saying why."""
    check_model_file(path)
    hf_config = read_hf_config(path)
    model_type = "gpt2" if hf_config is None else hf_config.get("model_type", "gpt2")
    if model_type == "gpt2":
        return load_hf_gpt2_file(path, **overrides), model_type
    if model_type in LLAMA_TYPES + MOE_TYPES:
        return load_hf_llama_file(path, **overrides), model_type
    if model_type == PHI3_TYPE:
        return load_hf_phi3_file(path, **overrides), model_type
    if model_type in GEMMA3_TYPES:
        return load_hf_gemma3_file(path, **overrides), model_type
    if model_type == GEMMA2_TYPE:
        return load_hf_gemma2_file(path, **overrides), model_type
    supported = ("gpt2",) + LLAMA_TYPES + MOE_TYPES + (PHI3_TYPE, GEMMA2_TYPE) + GEMMA3_TYPES
    try:
        check_no_unsupported_moe(hf_config, model_type)
    except ValueError as err:
        raise ValueError(f"{path!r}: {err}") from None
    if model_type in _OTHER_GEMMAS:
        raise ValueError(f"{path!r}: model_type={model_type!r} is not supported: the model here does not compute "
                         f"{_OTHER_GEMMAS[model_type]}; of the Gemmas, Gemma 2 and Gemma 3 import "
                         f"({(GEMMA2_TYPE,) + GEMMA3_TYPES})")
    raise ValueError(f"{path!r}: its config.json has model_type={model_type!r}; the models that can be imported "
                     f"are {supported}")
