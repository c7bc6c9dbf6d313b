"""One line to compile a Hugging Face Llama with AdaFuse adapters, then plain `generate()`.

Random weights from a small config (no download); swap in `from_pretrained(...)` for a real model.

    python examples/compile_hf_llama.py
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adafuse_compile as af


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    af.inject(model, af.AdaFuseConfig(num_experts=8, rank=16, target_modules=("q_proj", "v_proj"), init_lora_b="normal"))
    model.generation_config.cache_implementation = "static"  # static shapes: one decode graph for every step
    prompt = torch.randint(0, config.vocab_size, (1, 12))

    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=32, do_sample=False)
        model.compile(backend="adafuse")  # the one line (compiles model.__call__ in place, so generate() uses it)
        fused = model.generate(prompt, max_new_tokens=32, do_sample=False)
    af.restore(model)  # backbone weights back in place before the model is used or saved elsewhere
    print("eager   :", eager[0, 12:].tolist())
    print("adafuse :", fused[0, 12:].tolist())
    print("identical:", torch.equal(eager, fused))


if __name__ == "__main__":
    main()
