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


def run(model, lengths, new_tokens=6, exact_length=True):
    gen = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for n in lengths:
            prompt = torch.randint(3, 200, (1, n), generator=gen).cuda()
            at_least = {"min_new_tokens": new_tokens} if exact_length else {}  # else an EOS may end it early
            out.append(model.generate(prompt, max_new_tokens=new_tokens, **at_least))
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


def test_the_deferred_stop_check_keeps_the_tokens_and_the_recorded_step():
    """transformers' deferred stop check (5.18+), turned on for CUDA by inject: same tokens as a sync
    per step, an EOS mid-way included, and the decode step is still replayed, not recorded again."""
    from adafuse_compile.modeling import generate_stop

    if not generate_stop.available():
        pytest.skip("this transformers has no DeferredStopCheck (before 5.18)")
    from transformers.generation import utils as hf_utils

    torch._dynamo.reset()
    model = build("eager")
    lengths = [5, 9, 5, 9]
    af.defer_stop_check(model, False)
    free = run(model, lengths, new_tokens=8)
    # an EOS emitted mid-way by the first prompt: its first new token unlike its first new token
    new = free[0][0, lengths[0]:].tolist()
    stop_at = next((i for i, t in enumerate(new) if t != new[0]), 0)
    model.generation_config.eos_token_id = new[stop_at]
    for _ in range(2):
        per_step = run(model, lengths, new_tokens=8, exact_length=False)
    assert per_step[0].shape[1] == lengths[0] + stop_at + 1 < lengths[0] + 8, "no early stop to undo"
    af.defer_stop_check(model, True)
    run(model, lengths, new_tokens=8, exact_length=False)  # warm-up: what the deferred path compiles or records
    made, init = [], hf_utils.DeferredStopCheck.__init__
    recorded = bench._cudagraphs_recorded()
    try:
        hf_utils.DeferredStopCheck.__init__ = lambda self, *a, **k: (made.append(self), init(self, *a, **k))[1]
        deferred = run(model, lengths, new_tokens=8, exact_length=False)
    finally:
        hf_utils.DeferredStopCheck.__init__ = init
    assert len(made) == len(lengths), "generate() did not defer its stop check on CUDA"
    assert bench._cudagraphs_recorded() == recorded, "the deferred path recorded CUDA graphs again"
    for a, b in zip(per_step, deferred):
        assert torch.equal(a, b)
