import pytest
import torch
from safetensors.torch import load_file, save_file

from adafuse_compile import AdaFuseConfig, AdapterCheckpointError, TinyLlama, TinyLlamaConfig, inject, load_adapters, save_adapters
from adafuse_compile.presets import tiny_hf_model

TINY = TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_seq_len=32)
CFG = AdaFuseConfig(num_experts=4, rank=4, target_modules="all-linear", init_lora_b="normal")


def test_round_trip_is_bit_exact_on_a_fresh_backbone(tmp_path):
    model = inject(TinyLlama(TINY).init_weights(seed=1), CFG)
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    saved = load_file(str(path))
    assert saved and not any(k.endswith(".weight") and "router" not in k for k in saved), "backbone leaked into file"
    fresh = load_adapters(TinyLlama(TINY).init_weights(seed=1), path)
    assert fresh.adafuse_config == CFG
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    tokens = torch.randint(0, 64, (2, 6))
    assert torch.equal(model(tokens), fresh(tokens))


def test_hf_round_trip(tmp_path):
    model = inject(tiny_hf_model("qwen2"), CFG)
    path = save_adapters(model, tmp_path / "a.safetensors")
    fresh = load_adapters(tiny_hf_model("qwen2"), path)
    tokens = torch.randint(0, 256, (1, 5))
    assert torch.equal(model(tokens).logits, fresh(tokens).logits)


def test_wrong_shape_names_the_tensor(tmp_path):
    model = inject(TinyLlama(TINY).init_weights(), CFG)
    path = save_adapters(model, tmp_path / "a.safetensors")
    wider = TinyLlamaConfig(**{**TINY.to_dict(), "intermediate_size": 64})
    target = TinyLlama(wider)
    with pytest.raises(AdapterCheckpointError, match=r"layers\.0\.mlp\.gate_proj\.lora_B.*shape \(4, 48, 4\).*\(4, 64, 4\)"):
        load_adapters(target, path)


def test_missing_tensor_names_it_and_changes_nothing(tmp_path):
    model = inject(TinyLlama(TINY).init_weights(), CFG)
    path = save_adapters(model, tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    del tensors["layers.1.self_attn.v_proj.lora_A"]
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    target = inject(TinyLlama(TINY).init_weights(), CFG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterCheckpointError, match=r"missing tensor 'layers\.1\.self_attn\.v_proj\.lora_A'"):
        load_adapters(target, tmp_path / "b.safetensors")
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k])


def test_not_an_adapter_file(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(AdapterCheckpointError, match="not an AdaFuse adapter file"):
        load_adapters(TinyLlama(TINY), tmp_path / "x.safetensors")
    (tmp_path / "step.onnx").write_bytes(b"\x08\x07" + bytes(64))  # another format altogether
    with pytest.raises(AdapterCheckpointError, match="not a safetensors file.*save_adapters"):
        load_adapters(TinyLlama(TINY), tmp_path / "step.onnx")
    with pytest.raises(AdapterCheckpointError, match="no such adapter file"):
        load_adapters(TinyLlama(TINY), tmp_path / "missing.safetensors")


def test_config_mismatch_with_already_injected_model(tmp_path):
    path = save_adapters(inject(TinyLlama(TINY), CFG), tmp_path / "a.safetensors")
    other = inject(TinyLlama(TINY), AdaFuseConfig(num_experts=4, rank=8))
    with pytest.raises(AdapterCheckpointError, match="different config"):
        load_adapters(other, path)
