"""generate() on a CUDA GPU with the adafuse backend under CUDA graphs: with the static cache kept
from call to call, prompts after the warm-up replay the recorded decode step (no new CUDA-graph
recording), and give the tokens of a new cache per call."""
import pytest
import torch

import adafuse_compile as af
from adafuse_compile import bench
from adafuse_compile.presets import tiny_hf_model

pytestmark = pytest.mark.gpu


def build(prefill: str):
    model = tiny_hf_model("llama", dtype=torch.bfloat16, hidden_size=256, intermediate_size=512,
                          num_hidden_layers=4).cuda()
    af.inject(model, af.AdaFuseConfig(num_experts=8, rank=16, target_modules="all-linear", init_lora_b="normal"))
    gc_ = model.generation_config
    gc_.cache_implementation, gc_.max_cache_len = "static", 64
    gc_.pad_token_id, gc_.eos_token_id, gc_.do_sample = 0, None, False
    options = {"cudagraphs": True}
    if prefill == "eager":  # generate()'s own compile of the decode step, as the bench's GPU runs
        from transformers import CompileConfig

        gc_.compile_config = CompileConfig(fullgraph=False, dynamic=None, backend="adafuse", mode=None,
                                           options=options)
        gc_.disable_compile = False
    else:  # the README's way: the prompt runs compiled too
        gc_.disable_compile = True
        model.compile(backend="adafuse", options=options)
    return model.eval()


def run(model, lengths, new_tokens=6):
    gen = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for n in lengths:
            prompt = torch.randint(3, 200, (1, n), generator=gen).cuda()
            out.append(model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens))
    return out


@pytest.mark.parametrize("prefill", ["eager", "compiled"])
def test_prompts_after_the_warm_up_replay_the_recorded_decode_step(prefill):
    torch._dynamo.reset()
    model = build(prefill)
    lengths = [5, 9, 5, 9]
    # Warm-up, in rounds until one records nothing. Each graph runs once uncaptured before it is
    # recorded, and a compiled prompt goes dynamic at its second length, its dynamic graph being
    # recorded once per length: the first H200 run (2026-12-04) saw a prefill recorded in the third
    # round after counting on two. With a new cache per call, the decode step is recorded in every
    # round instead, and the warm-up never settles.
    recorded, rounds = bench._cudagraphs_recorded(), 0
    assert recorded is not None, "no CUDA-graph trees in this torch"
    while rounds < 4:
        run(model, lengths)
        rounds, before, recorded = rounds + 1, recorded, bench._cudagraphs_recorded()
        if rounds > 1 and recorded == before:
            break
    assert recorded > 0, "CUDA graphs were not used"
    assert recorded == before, f"still recording after {rounds} rounds of the same prompts"
    reused = run(model, lengths)
    assert bench._cudagraphs_recorded() == recorded, "a prompt recorded the decode step again"
    af.reuse_static_cache(model, False)  # transformers' way: a new cache per call
    fresh = run(model, lengths)
    # Not asserted (it is transformers' behaviour, from 5.15): how many recordings a new cache per
    # call costs, for the log.
    print(f"\n[{prefill} prefill] CUDA graphs recorded by {len(lengths)} prompts: cache kept 0, "
          f"new cache per call {bench._cudagraphs_recorded() - recorded}")
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)
