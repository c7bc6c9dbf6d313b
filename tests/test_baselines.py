import torch

from adafuse_compile import AdaFuseConfig, TinyLlama, TinyLlamaConfig, greedy_decode, inject
from adafuse_compile.baselines import MoLALinear, SimpleMerge, inject_layerwise

TINY = TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_seq_len=32)
CFG = AdaFuseConfig(num_experts=4, rank=4, alpha=8, target_modules="all-linear", init_lora_b="normal")


def test_mola_layer_matches_a_dense_per_token_reference():
    model = inject_layerwise(TinyLlama(TINY).init_weights(std=0.1).double(), CFG)
    lin = model.layers[1].mlp.down_proj
    assert isinstance(lin, MoLALinear)
    routers = [m for m in model.modules() if isinstance(m, MoLALinear)]
    assert len(routers) == 2 * 7  # a router in every adapted linear
    x = torch.randn(5, lin.in_features, dtype=torch.float64)
    probs_top, idx = torch.topk(lin.router(x), 2, dim=-1)
    g = torch.softmax(probs_top, -1)
    ref = x @ lin.weight.T
    for t in range(5):
        for j in range(2):
            e = idx[t, j]
            ref[t] += g[t, j] * lin.scaling * lin.lora_B[e].weight @ (lin.lora_A[e].weight @ x[t])
    torch.testing.assert_close(lin(x), ref, rtol=1e-12, atol=1e-12)


def test_simple_merge_decode_matches_unmerged_and_restores_weights():
    model = inject(TinyLlama(TINY).init_weights(std=0.1).double(), CFG).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(0, 64, (1, 5))
    model.setup_cache(1)
    ref_tokens, ref_logits = greedy_decode(model, prompt, 10)
    model.setup_cache(1)
    with SimpleMerge(model):
        tokens, logits = greedy_decode(model, prompt, 10)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-12)


def test_simple_merge_actually_merges_weights_during_decode():
    model = inject(TinyLlama(TINY).init_weights(std=0.1), CFG).eval()
    w = model.layers[0].self_attn.q_proj.weight
    w0 = w.clone()
    model.setup_cache(1)
    with SimpleMerge(model):
        model(torch.tensor([[3]]), torch.tensor([0]))
        assert not torch.equal(w, w0)  # merged while inside
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)
