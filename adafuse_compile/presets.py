"""Small model presets (random weights, no download) shared by the demo, tests and benchmarks."""
from __future__ import annotations

import torch
from torch import nn

# Hugging Face families the model side supports, and what differs between them.
HF_FAMILIES = {
    "llama": dict(config="LlamaConfig", model="LlamaForCausalLM", extra={}),
    "mistral": dict(config="MistralConfig", model="MistralForCausalLM", extra={"sliding_window": None}),
    "qwen2": dict(config="Qwen2Config", model="Qwen2ForCausalLM", extra={}),  # q/k/v carry a bias
}

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_BLOCK = (*_ATTENTION, "gate_proj", "up_proj", "down_proj")
_FUSED_QKV = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# More families, each with the linears to adapt (their names differ; MoE backbones: attention only),
# for tests that name their targets and benchmarks/check_hf_families.py. Phi-3 registers o_proj
# before qkv_proj though it calls it after (inject places the router by call order).
OTHER_HF_FAMILIES = {
    "phi3": dict(config="Phi3Config", model="Phi3ForCausalLM", extra={"pad_token_id": 0},
                 targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "qwen3": dict(config="Qwen3Config", model="Qwen3ForCausalLM", extra={"head_dim": 16}, targets=_LLAMA_BLOCK),
    "gemma": dict(config="GemmaConfig", model="GemmaForCausalLM", extra={"head_dim": 16}, targets=_LLAMA_BLOCK),
    "gemma2": dict(config="Gemma2Config", model="Gemma2ForCausalLM", extra={"head_dim": 16, "sliding_window": 8},
                   targets=_LLAMA_BLOCK),
    "gemma3": dict(config="Gemma3TextConfig", model="Gemma3ForCausalLM", extra={"head_dim": 16, "sliding_window": 8},
                   targets=_LLAMA_BLOCK),
    "olmo2": dict(config="Olmo2Config", model="Olmo2ForCausalLM", extra={"pad_token_id": 0}, targets=_LLAMA_BLOCK),
    "granite": dict(config="GraniteConfig", model="GraniteForCausalLM", extra={}, targets=_LLAMA_BLOCK),
    "cohere": dict(config="CohereConfig", model="CohereForCausalLM", extra={"pad_token_id": 0}, targets=_LLAMA_BLOCK),
    "stablelm": dict(config="StableLmConfig", model="StableLmForCausalLM", extra={}, targets=_LLAMA_BLOCK),
    "phi": dict(config="PhiConfig", model="PhiForCausalLM", extra={},
                targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
    "starcoder2": dict(config="Starcoder2Config", model="Starcoder2ForCausalLM", extra={"sliding_window": None},
                       targets=(*_ATTENTION, "c_fc", "c_proj")),
    "glm": dict(config="GlmConfig", model="GlmForCausalLM", extra={"head_dim": 16, "pad_token_id": 0},
                targets=(*_ATTENTION, "gate_up_proj", "down_proj")),
    "gpt_neox": dict(config="GPTNeoXConfig", model="GPTNeoXForCausalLM",
                     extra={"pad_token_id": 0, "num_key_value_heads": None}, targets=_FUSED_QKV),
    "falcon": dict(config="FalconConfig", model="FalconForCausalLM",
                   extra={"new_decoder_architecture": True, "num_kv_heads": 2, "pad_token_id": 0}, targets=_FUSED_QKV),
    "mixtral": dict(config="MixtralConfig", model="MixtralForCausalLM",
                    extra={"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, targets=_ATTENTION),
    "qwen3_moe": dict(config="Qwen3MoeConfig", model="Qwen3MoeForCausalLM",
                      extra={"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                      targets=_ATTENTION),
}

TINY_HF_SHAPE = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
)


def tiny_hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A tiny Hugging Face causal LM of `family` (llama | mistral | qwen2 | phi3), GQA, random weights."""
    import transformers

    families = {**HF_FAMILIES, **OTHER_HF_FAMILIES}
    if family not in families:
        raise ValueError(f"unknown family {family!r}; known: {sorted(families)}")
    spec = families[family]
    cfg = getattr(transformers, spec["config"])(**{**TINY_HF_SHAPE, **spec["extra"], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, spec["model"])(cfg).to(dtype).eval()
    with torch.no_grad():  # HF inits biases to zero; give Qwen2's q/k/v biases values so they matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.02)
    return model
