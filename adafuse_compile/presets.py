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

TINY_HF_SHAPE = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
)


def tiny_hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A tiny Hugging Face causal LM of `family` (llama | mistral | qwen2), GQA, random weights."""
    import transformers

    if family not in HF_FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(HF_FAMILIES)}")
    spec = HF_FAMILIES[family]
    cfg = getattr(transformers, spec["config"])(**{**TINY_HF_SHAPE, **spec["extra"], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, spec["model"])(cfg).to(dtype).eval()
    with torch.no_grad():  # HF inits biases to zero; give Qwen2's q/k/v biases values so they matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.02)
    return model
