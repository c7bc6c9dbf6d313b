import importlib.util
from pathlib import Path

import torch

from adafuse_compile import TinyLlama

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_tiny.py"


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_loss_falls_and_backbone_is_unchanged():
    example = load_example()
    reference = TinyLlama(example.MODEL).init_weights(std=0.05, seed=0).state_dict()
    model, losses = example.train(steps=150, batch=32, log=None)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"
    state = model.state_dict()
    for key, value in reference.items():
        assert torch.equal(state[key], value), f"backbone tensor {key} changed during training"


def test_gradients_reach_router_and_experts_only():
    example = load_example()
    model, _ = example.train(steps=3, batch=4, log=None)  # B starts at zero: A gets gradients from step 2 on
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for kind in ("router", "lora_A", "lora_B"):
        assert any(kind in n for n in with_grad), f"no gradient reached {kind}"
    assert all("lora_" in n or "router" in n for n in with_grad)
