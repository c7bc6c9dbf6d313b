"""Export a small model with AdaFuse adapters to ONNX and decode it with ONNX Runtime (CPU).

    python examples/export_onnx.py [--out exported/] [--tokens 32]

Builds the package's TinyLlama with pre-gated LoRA-MoE adapters, exports the routing prologue and
the static decode step, decodes greedily with ONNX Runtime (prologue -> SGMM switch -> step), and
compares tokens and logits with eager PyTorch.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import adafuse_compile as af
from adafuse_compile.export import OnnxDecoder, check_tensorrt_facts, to_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="export directory (default: a temporary one)")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = af.TinyLlama(af.TinyLlamaConfig(max_seq_len=128)).init_weights(std=0.08)
    af.inject(model, af.AdaFuseConfig(num_experts=8, rank=8, top_k=2, init_lora_b="normal"))
    model.eval()
    out = args.out or tempfile.mkdtemp(prefix="adafuse_export_")
    result = to_onnx(model, out, capacity=64)
    print(f"exported to {result.out_dir} in {result.seconds:.1f} s: {result.bytes}")
    print(f"switched weights (step inputs): {result.manifest['switched']}")
    print(f"TensorRT facts: {'ok' if check_tensorrt_facts(out).ok else check_tensorrt_facts(out).problems}")
    prompt = torch.tensor([[1, 2, 3, 4]])
    model.setup_cache(1)
    ref_tokens, ref_logits = af.greedy_decode(model, prompt, args.tokens)
    tokens, logits = OnnxDecoder(out).generate(prompt[0], args.tokens)
    err = ((logits - ref_logits[0]).abs().max() / ref_logits[0].abs().max()).item()
    print(f"ONNX Runtime vs eager: tokens {'identical' if torch.equal(tokens, ref_tokens[0]) else 'DIFFER'}, "
          f"max relative logit error {err:.1e}")


if __name__ == "__main__":
    main()
