"""`adafuse bench`: end-to-end decode latency and memory of LoRA-MoE variants, the paper's protocol.

Protocol (paper, runtime section; DESIGN.md section 7): P prompts (default 50) served one by one
at batch 1, N new tokens each (default 200), greedy. Prompts are synthetic token ids with lengths
drawn from `prompt_lengths` (log-normal, see there). Per prompt the prefill and the decode are
timed separately (CUDA events on the GPU, perf_counter on the CPU); decode ms/token =
(time of steps 2..N) / (N - 1), so the prefill never enters it. Each method runs on a fresh model
built from the same seed, after a warm-up on two prompts of other lengths (compilation, CUDA-graph
recording), with the peak-memory counter reset before the model is built.

Time budgets (for runs that must fit a fixed window, e.g. one 10-minute GPU call): with
`method_budget_s` a method stops serving prompts once its measured prompts have taken that many
seconds (wall clock; at least one prompt is always served, after the warm-up), and its entry says
how many it served of how many asked (`prompts_served`, `prompts_asked`, `truncated_by_budget`).
With `budget_s` no method starts once the run has taken that many seconds: the rest are recorded
with status "skipped". The per-prompt lists then cover the first `prompts_served` prompts of
`prompt_lengths`. `prefill`: "compiled" (default) runs the prompt through the compiled model too;
"eager" compiles only the one-token decode step and runs the prompt through the uncompiled model
(gpt-fast's default, and what generate()'s own compile does): one compiled graph per method instead
of three (the prefill at the warm-up's first length, the decode step, the prefill again for any
length: Dynamo's recompile log on the tiny preset).

Two decode loops, `loop`:
- "hf": Hugging Face `generate()` (what users run) on LlamaForCausalLM / MistralForCausalLM built
  from the preset's config, static cache sized once for the longest prompt (no reallocation, no
  recompilation between prompts), `disable_compile=True` so that generate() never compiles on its
  own (on CUDA with a static cache it otherwise wraps the forward in its own torch.compile):
  every compiled method is compiled by us, with `model.compile(...)`; with prefill "eager", through
  `generation_config.compile_config` instead, so that generate() compiles the decode forward only
  (our backend and options). Decode steps are timed by a logits processor that records an event
  after each forward (no host sync added).
- "own": the package's TinyLlama (gpt-fast style, static KV cache) with the same shape, and a
  plain greedy loop over `model(tokens, input_pos)`.

Methods (`METHODS`, in table order; they run in the order of `BenchConfig.methods`, else of
`RUN_ORDER`: the cheap, most telling ones first, so that a time budget cuts the least useful):
the backbone eager and compiled "the same way" as adafuse (the adafuse backend on a model
without adapters: Inductor, CUDA graphs on the GPU; this is the reference every ratio divides
by), layer-wise routed MoE-LoRA (MoLA style) eager and under
torch.compile (regional: each decoder layer compiled on its own, the model around them eager; with
prefill "eager" the own loop bypasses the compiled layers for the prompt, generate() does not),
the pre-gated model eager and under torch.compile (default Inductor), the paper's
simple merge (`baselines.SimpleMerge`), and the adafuse backend: merge with each SGMM
implementation, and factor / gather / auto where `settings.AVAILABLE_PATHS` has them. A path
or kernel that cannot run here gets status "unavailable" with the reason; a method that raises
gets status "failed" with the error; neither stops the run.

JSON schema (`schema: "adafuse-bench/1"`; every key always present, null where not measurable):

    {
      "schema": "adafuse-bench/1",
      "env": {"device", "gpu", "driver", "cuda", "torch", "transformers", "python", "platform",
              "adafuse_compile", "cpu_threads", "git_commit", "git_dirty", "source_digest", "available_paths", "date",
              "gpu_shared_with_lock"},  # lock path when other benchmarks compiled on the GPU's host meanwhile
                                        # (their GPU work never overlapped ours: gpu_lock), else null
      "config": {"preset", "hf_config_path", "family", "model": {HF config fields used},
                 "dtype", "device", "targets", "target_modules", "adapters": {"num_experts", "rank",
                 "top_k", "alpha", "b_std", "weight_std"}, "prompts", "new_tokens", "loops",
                 "codegen", "cudagraphs", "seed", "max_cache_len",
                 "prompt_distribution": {"kind", "median", "sigma", "min", "max", "seed"},
                 "prefill": "compiled"|"eager", "hf_cache": "reused"|"per-call",
                 "hf_stop_check": "deferred"|"per-step", "hf_stop_check_effective": str,  # in words
                 "method_budget_s": float|null, "budget_s": float|null,
                 "run_order": [method name, ...]},   # the order the methods ran in (per loop)
      "prompt_lengths": [int, ...],                     # one per prompt, in serving order
      "analytics": {"backbone_params", "backbone_linear_flops_per_token",
                    "backbone_attention_flops_per_token", "backbone_flops_per_token",
                    "mean_context", "kinds": {kind: {"params", "param_overhead_pct",
                    "flops_per_token", "flop_overhead_pct", "note"}}},
      "results": [                                      # one per (loop, method), in run order
        {"loop": "hf"|"own", "method": str, "label": str, "kind": str,
         "status": "ok"|"failed"|"unavailable"|"skipped", "reason": str|null,  # why not ok
         "traceback": str|null,                         # the tail of the traceback of a failed method
         "compile": {...how it was compiled...},
         "decode_ms_per_token": [float per served prompt]|null, "prefill_ms": [float per served prompt]|null,
         "generate_calls_with_deferred_stop_check": "deferred/calls"|null,  # timed generate() calls (hf loop)
         "warmup_s": float|null, "peak_memory_bytes": int|null,
         "prompts_asked": int, "prompts_served": int|null,  # served < asked only under method_budget_s
         "truncated_by_budget": bool, "measure_s": float|null,  # wall s of the measured prompts
         "start_s": float|null, "method_s": float|null,  # when it started in the run, its whole wall time
         "tokens_sha1": [str per served prompt]|null, "reference_method": str|null,
         "tokens": [str per served prompt]|null,       # the greedy token ids themselves, joined by spaces
         "tokens_match_reference": float|null,          # fraction of prompts with identical tokens
         "tokens_first_difference": [int|null per prompt both served]|null,  # first differing token, 0-based
         "adafuse_paths": [str]|null,                   # what the backend did per graph (merge/gather/None)
         "summary": {"decode_ms_median", "decode_ms_p90", "decode_ms_mean", "prefill_ms_median",
                     "tokens_per_s", "x_backbone", "overhead_pct", "memory_overhead_pct",
                     "param_overhead_pct", "flop_overhead_pct"}|null}
      ],
      "pending": ["loop:method", ...],                  # not run yet: empty once the run has finished
      "wall_s": float
    }

Adding keys keeps the schema "adafuse-bench/1": with no budget every list has one value per prompt,
as before. A partial file (written after each method when `run_bench` gets a `checkpoint`) has the
methods that finished and lists the others under "pending".

Ratios (`x_backbone`, `overhead_pct`, `memory_overhead_pct`) divide by the method "backbone" of
the same loop. Python: `run_bench(BenchConfig(...))` returns this dict; `write_outputs(result, path)`
writes it with the Markdown table (paper Table 5 layout) and the PNG plot next to it.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import gpu_lock
from . import settings as af_settings
from .baselines import MoLALinear, SimpleMerge, inject_layerwise
from .config import LLAMA_LINEARS, AdaFuseConfig
from .modeling import TinyLlama, TinyLlamaConfig, adapted_linears, inject
from .modeling.generate_cache import makes_a_cache_per_call
from .modeling.generate_stop import decisions as generate_stop_decisions
from .modeling.generate_stop import stop_check_mode
from .modeling.inject import defer_stop_check, gate_channel, is_injected, reuse_static_cache

SCHEMA = "adafuse-bench/1"
TARGETS = {"qv": ("q_proj", "v_proj"), "all": LLAMA_LINEARS}
LOOPS = ("hf", "own")
PREFILLS = ("compiled", "eager")
# How generate() gets its KV cache. reused: one StaticCache per method, kept by adafuse's reuse_static_cache and
# reset between prompts. per-call: generate() makes a new one per call (cache_implementation="static"), as
# transformers 5.x does, so the decode graph's cache inputs get new addresses with every prompt and
# Inductor's CUDA-graph trees record the step again (a new root, checked on every later step).
HF_CACHES = ("reused", "per-call")
# How generate() decides to stop after each step. deferred: transformers' deferred stop check (5.18+), turned on
# for CUDA by adafuse (modeling/generate_stop.py): the stop flag is read one step late, so the host prepares the
# next step while the GPU runs this one. per-step: transformers' default on CUDA, a host sync after every step,
# which adds the host's per-step work to every token. The same for every method; the tokens are the same.
HF_STOP_CHECKS = ("deferred", "per-step")

# Prompt lengths: log-normal, median 96 tokens, sigma 1.0 (natural log), clipped to [4, 1024].
# Why: ShareGPT first user turns are short with a heavy tail; published statistics of the
# ShareGPT sets used by serving benchmarks (vLLM's benchmark_serving, the Orca/vLLM papers) put
# the median prompt near 100 tokens and the mean between about 160 and 230, with a tail past
# 1,000. A log-normal with median 96 and sigma 1.0 has mean 158 and p90 345 before clipping.
# These parameters are chosen to resemble those figures, not fit to the dataset (no download).
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_MIN, PROMPT_MAX = 96, 1.0, 4, 1024


@dataclass(frozen=True)
class Preset:
    """A model shape (Hugging Face config fields), its adapters, and the protocol defaults."""

    family: str  # llama | mistral (Hugging Face class family)
    model: dict
    dtype: str
    device: str
    prompts: int
    new_tokens: int
    max_prompt_len: int = PROMPT_MAX
    num_experts: int = 8
    rank: int = 64
    top_k: int = 2
    weight_std: float = 0.02
    b_std: float = 0.002
    codegen: str = "inductor"  # code generator of the compiled methods unless --codegen says otherwise


LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rope_theta=10000.0, rms_norm_eps=1e-5)
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None)  # Mistral-7B v0.2+: no sliding window
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5)

PRESETS = {
    "llama2-7b": Preset("llama", LLAMA2_7B, "bfloat16", "cuda", prompts=50, new_tokens=200),
    "mistral-7b": Preset("mistral", MISTRAL_7B, "bfloat16", "cuda", prompts=50, new_tokens=200),
    # CPU smoke preset: the whole method list through both loops in well under two minutes.
    # fp32, so adafuse's tokens can be compared with the pre-gated eager model's exactly.
    # 4 experts (not 8): the layer-wise peer's torch.compile (one data-dependent branch per expert and
    # linear) is the slowest compile; 4 keeps top-2 routing meaningful at half the cost. Codegen eager:
    # Dynamo capture and the adafuse passes run as for the GPU presets, but the graphs run as FX code;
    # with Inductor's C++ codegen a cold-cache run took 122 s on the 2-core development machine
    # (20 graphs), eager 35 s. `--codegen inductor` runs the tiny preset through Inductor.
    "tiny": Preset("llama", TINY, "float32", "cpu", prompts=3, new_tokens=8, max_prompt_len=48, num_experts=4,
                   rank=16, b_std=0.02, codegen="eager"),
}
FAMILY_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


@dataclass
class BenchConfig:
    preset: str = "tiny"
    # A user's HF config.json: replaces the preset's shape; the protocol (prompts, tokens, adapters,
    # device, dtype) still comes from the preset, e.g. preset="llama2-7b" for a 7B-class GPU run.
    hf_config: str | None = None
    targets: str = "qv"  # qv | all
    loop: str = "both"  # hf | own | both
    prompts: int | None = None  # None: the preset's
    new_tokens: int | None = None
    methods: tuple[str, ...] | None = None  # None: all, in RUN_ORDER; else names from METHODS, run in this order
    device: str | None = None  # None: the preset's (cuda presets fall back to nothing: they need a GPU)
    dtype: str | None = None
    codegen: str | None = None  # inductor | eager for compiled methods; None: the preset's
    seed: int = 0
    # CPU intra-op threads. None: 1 on the CPU (on a shared 2-core machine, 2 OpenMP threads made
    # whole methods 20x to 80x slower whenever another process held a core), torch's default on the GPU.
    threads: int | None = None
    progress: bool = True
    # compiled: the prompt runs through the compiled model too; eager: only the decode step is compiled
    prefill: str = "compiled"
    # Seconds of measured prompts after which a method stops serving prompts (at least one is served).
    method_budget_s: float | None = None
    # Seconds into the run after which no method starts; the rest are recorded as skipped.
    budget_s: float | None = None
    hf_cache: str = "reused"  # reused | per-call: the KV cache generate() decodes into (HF_CACHES)
    hf_stop_check: str = "deferred"  # deferred | per-step: generate()'s stop check (HF_STOP_CHECKS)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets={self.targets!r} is not one of {sorted(TARGETS)}")
        if self.loop not in (*LOOPS, "both"):
            raise ValueError(f"loop={self.loop!r} is not one of hf, own, both")
        if self.codegen not in (None, "inductor", "eager"):
            raise ValueError(f"codegen={self.codegen!r} is not one of inductor, eager")
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill={self.prefill!r} is not one of {', '.join(PREFILLS)}")
        if self.hf_cache not in HF_CACHES:
            raise ValueError(f"hf_cache={self.hf_cache!r} is not one of {', '.join(HF_CACHES)}")
        if self.hf_stop_check not in HF_STOP_CHECKS:
            raise ValueError(f"hf_stop_check={self.hf_stop_check!r} is not one of {', '.join(HF_STOP_CHECKS)}")
        for name, v in (("method_budget_s", self.method_budget_s), ("budget_s", self.budget_s)):
            if v is not None and not v >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {v}")
        for name, v in (("prompts", self.prompts), ("new_tokens", self.new_tokens)):
            if v is not None and v < (1 if name == "prompts" else 2):
                raise ValueError(f"{name} must be >= {1 if name == 'prompts' else 2}, got {v}")
        if self.methods is not None:
            unknown = sorted(set(self.methods) - {m.name for m in METHODS})
            if unknown:
                raise ValueError(f"unknown methods {unknown}; valid: {[m.name for m in METHODS]}")
            if len(set(self.methods)) != len(self.methods):
                raise ValueError(f"methods lists a method twice: {list(self.methods)}")


# Prompts ---------------------------------------------------------------------------------------

def prompt_lengths(n: int, seed: int = 0, max_len: int = PROMPT_MAX) -> list[int]:
    """n prompt lengths, log-normal (median PROMPT_MEDIAN, sigma PROMPT_SIGMA), clipped to [4, max_len]."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    raw = torch.exp(math.log(PROMPT_MEDIAN) + PROMPT_SIGMA * z)
    hi = min(PROMPT_MAX, max_len)
    return [int(v) for v in raw.round().clamp(PROMPT_MIN, hi).tolist()]


def make_prompts(lengths: list[int], vocab: int, seed: int, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    lo = min(3, vocab - 1)  # keep clear of the usual special ids 0..2
    return [torch.randint(lo, vocab, (1, n), generator=gen).to(device) for n in lengths]


# Models ----------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Spec:
    """Everything resolved from the config: shape, dtype, device, adapters, protocol."""

    preset: str
    family: str
    model: dict
    dtype: torch.dtype
    device: torch.device
    prompts: int
    new_tokens: int
    max_prompt_len: int
    adapters: AdaFuseConfig
    weight_std: float
    b_std: float
    codegen: str
    cudagraphs: bool
    seed: int
    hf_config_path: str | None
    prefill: str = "compiled"
    hf_cache: str = "reused"
    hf_stop_check: str = "deferred"

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def resolve(cfg: BenchConfig) -> Spec:
    preset = PRESETS[cfg.preset]
    family, model = preset.family, dict(preset.model)
    if cfg.hf_config:
        try:
            d = json.loads(Path(cfg.hf_config).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--hf-config {cfg.hf_config}: not a readable JSON file ({exc})") from None
        if not isinstance(d, dict):
            raise ValueError(f"--hf-config {cfg.hf_config}: a Hugging Face config.json is a JSON object, "
                             f"got {type(d).__name__}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"--hf-config {cfg.hf_config}: missing {missing} (a model's config.json)")
        family = d.get("model_type", "llama")
        if family not in FAMILY_CLASSES:
            raise ValueError(f"{cfg.hf_config}: model_type={family!r} is not supported; "
                             f"supported: {sorted(FAMILY_CLASSES)}")
        keep = ("architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                "model_type")
        model = {k: v for k, v in d.items() if k not in keep}
    device = torch.device(cfg.device or preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        if cfg.device:
            raise RuntimeError(f"--device {cfg.device}: no CUDA device is available; use --device cpu")
        raise RuntimeError(f"preset {cfg.preset!r} runs on CUDA and no CUDA device is available; "
                           f"use --preset tiny or --device cpu")
    dtype = _DTYPES[cfg.dtype or preset.dtype]
    adapters = AdaFuseConfig(num_experts=preset.num_experts, rank=preset.rank, top_k=preset.top_k,
                             target_modules=TARGETS[cfg.targets], init_lora_b="normal")
    return Spec(cfg.preset, family, model, dtype, device, cfg.prompts or preset.prompts,
                cfg.new_tokens or preset.new_tokens, preset.max_prompt_len, adapters, preset.weight_std,
                preset.b_std, cfg.codegen or (preset.codegen if device.type == "cpu" else "inductor"),
                device.type == "cuda", cfg.seed, cfg.hf_config, cfg.prefill, cfg.hf_cache, cfg.hf_stop_check)


@torch.no_grad()
def _init_weights(model: nn.Module, std: float, seed: int) -> None:
    """Random backbone weights N(0, std), norms left at one; seeded on the model's device (fast at 7B)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:  # matrices, and biases (Qwen2's q/k/v)
            p.normal_(0.0, std, generator=gen)


@torch.no_grad()
def _init_adapters(model: nn.Module, spec: Spec) -> None:
    """Expert A like LoRA (kaiming, from inject), B ~ N(0, b_std), router N(0, 0.02); seeded."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(spec.seed + 7)
    for m in model.modules():
        if isinstance(m, MoLALinear):
            for b in m.lora_B:
                b.weight.normal_(0.0, spec.b_std, generator=gen)
    for lin in adapted_linears(model).values() if is_injected(model) else ():
        lin.lora_B.normal_(0.0, spec.b_std, generator=gen)


def own_config(spec: Spec, max_seq_len: int) -> TinyLlamaConfig:
    if spec.family == "qwen2":
        raise ValueError("the package's TinyLlama has no q/k/v bias (Qwen2); use --loop hf")
    return tiny_llama_config(spec.model, max_seq_len)


def tiny_llama_config(m: dict, max_seq_len: int) -> TinyLlamaConfig:
    """The package's TinyLlama with a Hugging Face Llama-style shape dict (e.g. LLAMA2_7B)."""
    heads = m["num_attention_heads"]
    head_dim = m.get("head_dim") or m["hidden_size"] // heads
    if head_dim * heads != m["hidden_size"]:
        raise ValueError(f"head_dim={head_dim} x heads={heads} != hidden_size={m['hidden_size']}: "
                         f"the package's TinyLlama needs hidden = heads x head_dim")
    return TinyLlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                           intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_hidden_layers"],
                           num_attention_heads=heads, num_key_value_heads=m.get("num_key_value_heads") or heads,
                           max_seq_len=max_seq_len, rope_theta=float(m.get("rope_theta", 10000.0)),
                           rms_norm_eps=float(m.get("rms_norm_eps", 1e-5)))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(spec: Spec, loop: str, max_cache_len: int) -> nn.Module:
    """A fresh backbone (same seed, so the same weights, for every method of a loop)."""
    torch.manual_seed(spec.seed)
    if loop == "hf":
        import transformers

        cfg_cls, model_cls = FAMILY_CLASSES[spec.family]
        cfg = getattr(transformers, cfg_cls)(**spec.model)
        with torch.device(spec.device), _default_dtype(spec.dtype):
            model = getattr(transformers, model_cls)(cfg)
        model = model.to(spec.dtype)
        gc_ = model.generation_config
        gc_.cache_implementation = "static"
        gc_.max_cache_len = max_cache_len
        gc_.disable_compile = True  # compiled methods are compiled by us, the others stay eager
        gc_.pad_token_id = 0
        gc_.eos_token_id = None
        gc_.do_sample = False
    else:
        with torch.device(spec.device), _default_dtype(spec.dtype):
            model = TinyLlama(own_config(spec, max_cache_len))
        model = model.to(spec.dtype)
    _init_weights(model, spec.weight_std, spec.seed)
    return model.eval()


# Methods ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: str  # backbone | layerwise | pregated | simple_merge | adafuse_merge | adafuse_unmerged
    adapters: str  # none | layerwise | pregated
    compiler: str | None = None  # None (eager) | "inductor" (plain torch.compile) | "adafuse"
    options: dict = field(default_factory=dict)  # adafuse backend options
    path: str | None = None  # adafuse path this method needs (checked against AVAILABLE_PATHS)
    gpu_only: bool = False
    reference: str | None = None  # method whose tokens this one should reproduce


METHODS: list[Method] = [
    Method("backbone_eager", "backbone, eager", "backbone", "none", reference=None),
    Method("backbone", "backbone, compiled (reference)", "backbone", "none", "adafuse", reference="backbone_eager"),
    Method("mola_eager", "layer-wise MoE-LoRA (MoLA style), eager", "layerwise", "layerwise"),
    Method("mola_compiled", "layer-wise MoE-LoRA, torch.compile (regional)", "layerwise", "layerwise", "inductor",
           reference="mola_eager"),
    Method("pregated_eager", "pre-gated LoRA-MoE, eager", "pregated", "pregated"),
    Method("pregated_inductor", "pre-gated LoRA-MoE, torch.compile (Inductor)", "pregated", "pregated", "inductor",
           reference="pregated_eager"),
    Method("simple_merge", "simple merge (paper Table 6)", "simple_merge", "pregated", reference="pregated_eager"),
    Method("adafuse_merge_reference", "adafuse merge, SGMM reference", "adafuse_merge", "pregated", "adafuse",
           {"path": "merge", "sgmm_impl": "reference"}, path="merge", reference="pregated_eager"),
    Method("adafuse_merge_triton", "adafuse merge, SGMM Triton", "adafuse_merge", "pregated", "adafuse",
           {"path": "merge", "sgmm_impl": "triton"}, path="merge", gpu_only=True, reference="pregated_eager"),
    Method("adafuse_merge_cutlass", "adafuse merge, SGMM CUTLASS", "adafuse_merge", "pregated", "adafuse",
           {"path": "merge", "sgmm_impl": "cutlass"}, path="merge", gpu_only=True, reference="pregated_eager"),
    Method("adafuse_factor", "adafuse factor", "adafuse_unmerged", "pregated", "adafuse", {"path": "factor"},
           path="factor", reference="pregated_eager"),
    Method("adafuse_gather", "adafuse gather", "adafuse_unmerged", "pregated", "adafuse", {"path": "gather"},
           path="gather", reference="pregated_eager"),
    Method("adafuse_auto", "adafuse auto", "adafuse_merge", "pregated", "adafuse", {"path": "auto"},
           path="auto", reference="pregated_eager"),
]
METHOD_BY_NAME = {m.name: m for m in METHODS}
# Run order when BenchConfig.methods is None: the reference and the adafuse paths first, then the
# baselines whose one compiled graph or eager prompts cost least, MoLA under torch.compile last: its
# regional compile is short now (40 s at the 7B shape, all seven linears, _compile_regional), but its
# decode is the slowest of all (337 ms/token there: a host sync per expert and linear), so one prompt
# of it costs more than most methods. Under a global time budget the methods cut are those at the end.
RUN_ORDER = ("backbone", "adafuse_gather", "adafuse_auto", "adafuse_merge_cutlass", "pregated_inductor", "simple_merge",
             "adafuse_factor", "pregated_eager", "mola_eager", "backbone_eager", "adafuse_merge_triton",
             "adafuse_merge_reference", "mola_compiled")
assert sorted(RUN_ORDER) == sorted(METHOD_BY_NAME), "RUN_ORDER must list every method once"


def unavailable_reason(method: Method, spec: Spec) -> str | None:
    """Why this method cannot run here (None: it can), asked of the package at run time."""
    if method.path is not None and method.path not in af_settings.AVAILABLE_PATHS:
        return (f"path {method.path!r} is not available in this build of adafuse_compile "
                f"(settings.AVAILABLE_PATHS = {list(af_settings.AVAILABLE_PATHS)})")
    if method.gpu_only and not spec.on_gpu:
        return f"sgmm_impl {method.options.get('sgmm_impl')!r} needs a CUDA device; this run is on {spec.device.type}"
    return None


def _adapt(model: nn.Module, method: Method, spec: Spec) -> nn.Module:
    torch.manual_seed(spec.seed + 3)
    if method.adapters == "pregated":
        inject(model, spec.adapters)
    elif method.adapters == "layerwise":
        inject_layerwise(model, spec.adapters)
    if method.adapters != "none":
        _init_adapters(model, spec)
    return model


def _regional(method: Method) -> bool:
    """Whether the method compiles each decoder layer instead of the whole model (see _compile_regional)."""
    return method.adapters == "layerwise" and method.compiler is not None


def _regional_dynamo_config(spec: Spec):
    """Dynamo settings around building, compiling and running a regionally compiled layer-wise model."""
    # MoLALinear's torch.where / index_add_ have data-dependent sizes: capture them instead of breaking the graph.
    # HF's attention indexes its cache with the int layer_idx, which Dynamo specializes on: one set
    # of graphs per HF layer (3 per layer on the tiny preset), so the limit of 8 per code object is raised to 8
    # per layer; and a layer that would still hit it fails the method instead of running eager, timed as compiled.
    per_code = 8 * spec.model["num_hidden_layers"]
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, recompile_limit=per_code,
                                      accumulated_recompile_limit=max(256, per_code), fail_on_recompile_limit_hit=True)


def _decoder_layers(model: nn.Module, loop: str) -> nn.ModuleList:
    """The repeated blocks: TinyLlama's `layers`; Llama/Mistral/Qwen2ForCausalLM's `model.layers`."""
    return model.model.layers if loop == "hf" else model.layers


def _compile_regional(model: nn.Module, kw: dict, info: dict, loop: str) -> tuple[Callable, dict]:
    """Compile each decoder layer in place (PyTorch's regional compilation); the model around them stays eager."""
    # Why: compiling the whole layer-wise model at the Llama-2-7B shape (224 adapted linears x 8 experts: 1792
    # data-dependent branches) never finished in the GPU budget. On the CPU (hidden 64, all seven linears,
    # 8 experts, aot_eager) it took 52 s at 4 layers and 97 s at 8, mostly symbolic-shape work on the unbacked
    # sizes; layer by layer, 11 s at 8 layers, one compiled layer reused by all. No fusion across layers then.
    for layer in _decoder_layers(model, loop):
        layer.compile(**kw)
    shared = ("one code object; Dynamo specializes it on HF's int layer_idx, so each layer gets its own graphs"
              if loop == "hf" else "one code object and one set of graphs for all layers")
    info["compiler"] += f", regional: each decoder layer compiled separately ({shared})"
    if loop == "hf":
        # generate() must not wrap the forward again (compile_config); the prompt then runs through the
        # compiled layers too, whatever `prefill` says (the own loop runs it with the compiled layers bypassed).
        model.generation_config.disable_compile = True
        info["prefill"] = "compiled"
    return model, info


def _force_eager(model: nn.Module) -> Callable:
    """The model with its compiled regions bypassed (torch.compiler.set_stance, torch >= 2.6)."""

    def run(*args):
        with torch.compiler.set_stance("force_eager"):
            return model(*args)

    return run


def _compile(model: nn.Module, method: Method, spec: Spec, loop: str) -> tuple[Callable, dict]:
    """The step callable for the own loop (or the model, compiled in place, for generate())."""
    if method.compiler is None:
        return model, {"compiler": "eager"}
    if method.compiler == "inductor":
        backend = "inductor" if spec.codegen == "inductor" else "eager"
        info = {"compiler": f"torch.compile(backend={backend!r}) default mode"}
        kw = {"backend": backend}
    else:
        options = {"codegen": spec.codegen, "cudagraphs": spec.cudagraphs, **method.options}
        info = {"compiler": "torch.compile(backend='adafuse')", "options": options}
        kw = {"backend": "adafuse", "options": options}
    info["prefill"] = spec.prefill
    if _regional(method):
        return _compile_regional(model, kw, info, loop)
    if loop == "hf" and spec.prefill == "eager":
        # generate()'s own compile: the prompt runs through the plain forward, the decode steps
        # through torch.compile(model.__call__, **compile_config) (mode None: our backend and options).
        from transformers import CompileConfig

        cc = CompileConfig(fullgraph=False, dynamic=None, backend=kw["backend"], mode=None, options=kw.get("options"))
        cc._compile_all_devices = True  # generate() compiles only on accelerators unless told (the CPU preset)
        model.generation_config.compile_config = cc
        model.generation_config.disable_compile = False
        return model, info
    if loop == "hf":
        model.compile(**kw)  # in place: generate() calls the compiled forward
        return model, info
    return torch.compile(model, **kw), info


# Timing ----------------------------------------------------------------------------------------

_now = time.perf_counter  # the clock of the time budgets (a test may replace it)


class _Clock:
    """Marks on the device timeline: CUDA events on the GPU (no sync), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def elapsed_ms(self, i: int, j: int) -> float:
        if self.cuda:
            return self.marks[i].elapsed_time(self.marks[j])
        return (self.marks[j] - self.marks[i]) * 1000.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _own_generate(step, prefill, prompt: torch.Tensor, n: int, positions: list, clock: _Clock) -> torch.Tensor:
    """Prefill (through `prefill`: the step itself or the uncompiled model), then n - 1 decode steps;
    marks: start, after prefill (first token), after the last step."""
    t = prompt.shape[1]
    # One prefill graph for every prompt length (the decode step stays static). A regionally compiled
    # model's layers see the embeddings, not this tensor: they go dynamic on their second length instead.
    if t > 1 and prefill is step:
        torch._dynamo.maybe_mark_dynamic(prompt, 1)
    clock.mark()
    nxt = prefill(prompt, torch.arange(t, device=prompt.device))[:, -1:].argmax(-1)
    clock.mark()
    out = [nxt]
    for i in range(n - 1):
        nxt = step(nxt, positions[t + i])[:, -1:].argmax(-1)
        out.append(nxt)
    clock.mark()
    return torch.cat(out, 1)


class _StepMarks:
    """A logits processor for generate(): marks the clock after each forward, changes nothing."""

    def __init__(self, clock: _Clock):
        self.clock = clock

    def __call__(self, input_ids, scores):
        self.clock.mark()
        return scores


def generate_cache(model: nn.Module, hf_cache: str, max_cache_len: int) -> None:
    """Sets up how every generate() call of `model` gets its KV cache under `hf_cache` (HF_CACHES):
    one StaticCache kept from call to call and reset in place (adafuse's `reuse_static_cache`, for
    every method, injected or not), or a new one per call, made by transformers.

    Why the kept one: transformers 5.x's generate() makes a new StaticCache per call, whose tensors
    are marked as static addresses. Under CUDA graphs (Inductor's CUDA-graph trees) a static input at
    a new address means the decode step is recorded again, as a new root that every later step checks
    before it finds its own; recording takes place inside the first decode step of the prompt.
    Keeping one cache keeps the addresses, so the step is recorded once. (Up to session 11 the bench
    passed one cache of its own to generate(); a cache passed in is the caller's, which transformers
    5.18-5.24 will not defer the stop check for: its static cache cannot drop the extra step.)"""
    model.generation_config.cache_implementation = "static"
    model.generation_config.max_cache_len = max_cache_len  # one length for every prompt: the cache always fits
    if makes_a_cache_per_call():  # up to 5.14 transformers keeps one static cache on the model itself
        reuse_static_cache(model, hf_cache == "reused")
    return None


def generate_stop_check(model: nn.Module, hf_stop_check: str) -> None:
    """Sets `model`'s generate() to defer its stop check or not under `hf_stop_check` (HF_STOP_CHECKS):
    the same for every method, injected or not (defer_stop_check sets up a plain model's generate())."""
    defer_stop_check(model, hf_stop_check == "deferred")


def _hf_generate(model, prompt: torch.Tensor, n: int, clock: _Clock) -> torch.Tensor:
    from transformers import LogitsProcessorList

    clock.mark()  # the step marks are CUDA events: GPU time between steps, whether or not the host waits
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         logits_processor=LogitsProcessorList([_StepMarks(clock)]))
    # marks: start, after forward 1 (prefill), ..., after forward n
    return out[:, prompt.shape[1]:]


def _cudagraphs_recorded() -> int | None:
    """CUDA graphs recorded so far by Inductor's CUDA-graph trees on this device; None where unknown.

    Reads the trees' private state (roots and their children), so any change there gives None,
    never an error: this is a diagnostic."""
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
        if manager is None:
            return 0
        nodes, count = [n for roots in manager.roots.values() for n in roots], 0
        while nodes:
            node = nodes.pop()
            count += 1
            nodes.extend(c for children in node.children.values() for c in children)
        return count
    except Exception:
        return None


def cudagraphs_recorded_since(before: int | None) -> int | None:
    """CUDA graphs recorded since `_cudagraphs_recorded()` read `before`; None where either is unknown
    (or the trees were reset in between)."""
    after = _cudagraphs_recorded() if before is not None else None
    return after - before if after is not None and after >= before else None


def _restore_weights(model: nn.Module) -> None:
    if is_injected(model):
        gate_channel(model).restore()


def _sha(ids: list[int]) -> str:
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]  # the same digest as before for the same ids


def _cleanup() -> None:
    from . import backend

    torch._dynamo.reset()
    backend.last_compilations.clear()
    gc.collect()
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            from torch._inductor import cudagraph_trees

            cudagraph_trees.reset_cudagraph_trees()
        torch.cuda.empty_cache()


def run_method(method: Method, spec: Spec, loop: str, prompts: list[torch.Tensor], max_cache_len: int,
               on_prompt: Callable[[], None] | None = None, budget_s: float | None = None) -> dict:
    """Build, adapt, compile, warm up and time one method; returns its raw entry (no summary yet).

    budget_s: stop serving prompts once the measured ones have taken this many seconds (at least one)."""
    from . import backend

    entry = _entry(method, loop, len(prompts))
    if method.compiler and spec.codegen != "inductor":
        entry["label"] = entry["label"].replace(" (Inductor)", "") + f" [codegen {spec.codegen}]"
    reason = unavailable_reason(method, spec)
    if reason is None and loop == "own":
        try:
            own_config(spec, max_cache_len)
        except ValueError as exc:  # a shape the package's TinyLlama cannot express (Qwen2 biases, head_dim)
            reason = f"own loop: {exc}"
    if reason:
        entry.update(status="unavailable", reason=reason)
        return entry
    model = step = None
    _cleanup()
    if spec.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    dyn_patch = _regional_dynamo_config(spec) if _regional(method) else contextlib.nullcontext()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        # Alone on the GPU, except while compiling, when other benchmarks share it (gpu_lock).
        with torch.no_grad(), dyn_patch, gpu_lock.held_except_compiles():
            model = _adapt(build_model(spec, loop, max_cache_len), method, spec)
            if loop == "own":
                model.setup_cache(1)
            else:
                generate_cache(model, spec.hf_cache, max_cache_len)
                generate_stop_check(model, spec.hf_stop_check)
            step, entry["compile"] = _compile(model, method, spec, loop)
            positions = [torch.tensor([p], device=spec.device) for p in range(max_cache_len)]
            merge_ctx = (lambda: SimpleMerge(model)) if method.kind == "simple_merge" else contextlib.nullcontext
            # own loop; generate() is set up by _compile. A regionally compiled model is its own step.
            prefill = step if spec.prefill == "compiled" else (_force_eager(model) if _regional(method) else model)
            n = spec.new_tokens

            def one(prompt, n_tokens):
                clock = _Clock(spec.device)
                with merge_ctx():
                    if loop == "hf":
                        tokens = _hf_generate(model, prompt, n_tokens, clock)
                    else:
                        tokens = _own_generate(step, prefill, prompt, n_tokens, positions, clock)
                clock.sync()
                _restore_weights(model)
                return tokens, clock

            # Warm-up: two prompts of lengths not in the timed set's first two, so a compiled prefill
            # graph goes dynamic in the sequence length before timing, and the decode graph is built.
            t0 = time.perf_counter()
            for length in (5, 11):
                warm = torch.randint(3, spec.model["vocab_size"], (1, min(length, spec.max_prompt_len)),
                                     generator=torch.Generator().manual_seed(99)).to(spec.device)
                one(warm, min(n, 4))
            entry["warmup_s"] = round(time.perf_counter() - t0, 3)
            decode, first_step_ms, prefill_ms, shas, token_lists = [], [], [], [], []
            recorded_before = _cudagraphs_recorded() if spec.on_gpu else None
            decided_before = generate_stop_decisions()
            t_measure = _now()
            for prompt in prompts:
                tokens, clock = one(prompt, n)
                if tokens.shape[1] != n:
                    raise RuntimeError(f"generated {tokens.shape[1]} tokens, expected {n}")
                last = len(clock.marks) - 1
                prefill_ms.append(clock.elapsed_ms(0, 1))
                decode.append(clock.elapsed_ms(1, last) / (n - 1))
                first_step_ms.append(clock.elapsed_ms(1, 2))  # where a CUDA-graph recording would land
                ids = tokens.flatten().tolist()
                shas.append(_sha(ids))
                token_lists.append(" ".join(map(str, ids)))  # one JSON line per prompt
                if on_prompt:
                    on_prompt()
                if budget_s is not None and _now() - t_measure >= budget_s and len(decode) < len(prompts):
                    entry["truncated_by_budget"] = True
                    break
            entry["measure_s"] = round(_now() - t_measure, 3)
            if loop == "hf":  # whether transformers did defer, call by call (a scope alone does not say)
                calls, deferred = (a - b for a, b in zip(generate_stop_decisions(), decided_before))
                entry["generate_calls_with_deferred_stop_check"] = f"{deferred}/{calls}"
            if spec.on_gpu:
                entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            # CUDA graphs Inductor recorded while the timed prompts ran (0 when every step replays)
            entry["cudagraphs_recorded_while_timed"] = cudagraphs_recorded_since(recorded_before)
            entry.update(status="ok", decode_ms_per_token=decode, first_decode_step_ms=first_step_ms,
                         prefill_ms=prefill_ms, tokens_sha1=shas, tokens=token_lists, prompts_served=len(decode))
            if _regional(method):  # HF: a multiple of the layers; own loop: the same as for one layer
                entry["compile"]["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
            if method.compiler == "adafuse":
                entry["adafuse_paths"] = [r.get("path", "merge" if r.get("rewritten") else None)
                                          for r in backend.last_compilations]
    except Exception as exc:  # one method's failure is a result, not the end of the run
        entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:2000],
                     traceback=traceback.format_exc()[-3000:])
    finally:
        if model is not None:
            with contextlib.suppress(Exception):
                _restore_weights(model)
        del model, step
        _cleanup()
    return entry


def _entry(method: Method, loop: str, prompts_asked: int) -> dict:
    return {"loop": loop, "method": method.name, "label": method.label, "kind": method.kind,
            "status": None, "reason": None, "compile": None, "decode_ms_per_token": None,
            "first_decode_step_ms": None, "cudagraphs_recorded_while_timed": None,
            "generate_calls_with_deferred_stop_check": None, "prefill_ms": None, "warmup_s": None, "peak_memory_bytes": None, "prompts_asked": prompts_asked, "prompts_served": None,
            "truncated_by_budget": False, "measure_s": None, "start_s": None, "method_s": None,
            "tokens_sha1": None, "tokens": None, "reference_method": method.reference,
            "tokens_match_reference": None, "tokens_first_difference": None,
            "adafuse_paths": None, "summary": None, "traceback": None}


# Analytics: parameters and FLOPs per token -------------------------------------------------------

def analytics(spec: Spec, mean_context: float) -> dict:
    """Parameter and FLOP overhead per decode token, analytic, against the backbone."""
    m = spec.model
    h, inter, layers = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
    heads = m["num_attention_heads"]
    kv = m.get("num_key_value_heads") or heads
    hd = m.get("head_dim") or h // heads
    vocab = m["vocab_size"]
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    block_linear = layers * sum(i * o for i, o in shapes.values())
    linear_params = block_linear + vocab * h  # + lm_head
    backbone_params = linear_params + vocab * h + layers * 2 * h + h  # + embeddings and norms
    lin_flops = 2 * linear_params
    attn_flops = 4 * layers * heads * hd * mean_context  # q.k and p.v over the context
    base_flops = lin_flops + attn_flops
    a = spec.adapters
    n, r, k = a.num_experts, a.rank, a.top_k
    adapted = [shapes[t] for t in a.target_modules] * layers
    expert_params = sum(n * r * (i + o) for i, o in adapted)
    first_in = adapted[0][0]
    unmerged = sum(2 * k * r * (i + o) for i, o in adapted)  # selected experts' A then B
    merge_exact = sum(2 * i * o * k * r for i, o in adapted)  # W = W0 + B_sel A_sel (K = k r)
    merge_swap = sum(2 * i * o * 2 * k * r for i, o in adapted)  # unmerge previous + merge (K = 2 k r)
    kinds = {
        "backbone": (0, 0, "no adapters"),
        "layerwise": (expert_params + sum(n * i for i, _ in adapted), sum(2 * n * i for i, _ in adapted) + unmerged,
                      "a router in every adapted linear + the selected experts unmerged"),
        "pregated": (expert_params + n * first_in, 2 * n * first_in + unmerged,
                     "one router + the selected experts unmerged"),
        "simple_merge": (expert_params + n * first_in, 2 * n * first_in + merge_swap,
                         "one router + per weight unmerge previous and merge current experts (K = 2 k r)"),
        "adafuse_merge": (expert_params + n * first_in, 2 * n * first_in + merge_exact,
                          "one router + exact switch W = W0 + B A (K = k r; in-place mode: K = 2 k r)"),
        "adafuse_unmerged": (expert_params + n * first_in, 2 * n * first_in + unmerged,
                             "one router + the selected experts unmerged (factor / gather)"),
    }
    return {
        "backbone_params": backbone_params,
        "backbone_linear_flops_per_token": lin_flops,
        "backbone_attention_flops_per_token": attn_flops,
        "backbone_flops_per_token": base_flops,
        "mean_context": mean_context,
        "kinds": {kind: {"params": p, "param_overhead_pct": 100.0 * p / backbone_params,
                         "flops_per_token": f, "flop_overhead_pct": 100.0 * f / base_flops, "note": note}
                  for kind, (p, f, note) in kinds.items()},
    }


# Summary ---------------------------------------------------------------------------------------

def _p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]


def summarize(result: dict) -> None:
    """Fill each ok entry's summary and token agreement (ratios against the loop's backbone)."""
    kinds = result["analytics"]["kinds"]
    by_key = {(e["loop"], e["method"]): e for e in result["results"]}
    for e in result["results"]:
        if e["status"] != "ok":
            continue
        d = e["decode_ms_per_token"]
        med = statistics.median(d)
        e["summary"] = {"decode_ms_median": med, "decode_ms_p90": _p90(d), "decode_ms_mean": statistics.fmean(d),
                        "prefill_ms_median": statistics.median(e["prefill_ms"]),
                        "tokens_per_s": 1000.0 / med if med > 0 else None, "x_backbone": None, "overhead_pct": None,
                        "memory_overhead_pct": None,
                        "param_overhead_pct": kinds[_analytic_kind(e)]["param_overhead_pct"],
                        "flop_overhead_pct": kinds[_analytic_kind(e)]["flop_overhead_pct"]}
    for e in result["results"]:
        if e["status"] != "ok":
            continue
        base = by_key.get((e["loop"], "backbone"))
        if base and base["status"] == "ok":
            ratio = e["summary"]["decode_ms_median"] / base["summary"]["decode_ms_median"]
            e["summary"]["x_backbone"] = ratio
            e["summary"]["overhead_pct"] = 100.0 * (ratio - 1.0)
            if e["peak_memory_bytes"] and base["peak_memory_bytes"]:
                e["summary"]["memory_overhead_pct"] = 100.0 * (e["peak_memory_bytes"] / base["peak_memory_bytes"] - 1)
        ref = by_key.get((e["loop"], e["reference_method"])) if e["reference_method"] else None
        if ref and ref["status"] == "ok":
            if e.get("tokens") and ref.get("tokens"):  # where bf16 runs part: early (a bug) or late (rounding)
                parted = [_first_difference(a, b) for a, b in zip(e["tokens"], ref["tokens"])]
                e["tokens_first_difference"] = parted
                e["tokens_match_reference"] = sum(i is None for i in parted) / len(parted)
            else:  # a result file written before the tokens were kept
                same = [a == b for a, b in zip(e["tokens_sha1"], ref["tokens_sha1"])]
                e["tokens_match_reference"] = sum(same) / len(same)


def _first_difference(a: str, b: str) -> int | None:
    """Index of the first generated token where two greedy runs of one prompt differ (None: identical).

    a, b: the runs' tokens as the result keeps them (ids joined by spaces); when one run is a prefix
    of the other, they part where the shorter one ends."""
    x, y = a.split(), b.split()
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None if len(x) == len(y) else min(len(x), len(y)))


def _analytic_kind(e: dict) -> str:
    if e["kind"] == "adafuse_merge" and e.get("adafuse_paths") and "merge" not in e["adafuse_paths"]:
        return "adafuse_unmerged"  # auto chose an unmerged path for every graph
    return e["kind"]


# Environment -----------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    import transformers

    from . import __version__

    env = {"device": device.type, "gpu": None, "driver": None, "cuda": torch.version.cuda, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
           "adafuse_compile": __version__, "cpu_threads": torch.get_num_threads(), "git_commit": None,
           "git_dirty": None, "source_digest": source_digest(),
           "available_paths": list(af_settings.AVAILABLE_PATHS),
           "gpu_shared_with_lock": gpu_lock.shared(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        with contextlib.suppress(Exception):
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    else:
        env["gpu"] = None
    here = Path(__file__).resolve().parent
    with contextlib.suppress(Exception):
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                           cwd=here).stdout.strip() or None
        if env["git_commit"]:  # the package's sources differ from that commit's (exit status 1)
            env["git_dirty"] = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here,
                                              timeout=10).returncode == 1
    return env


def source_digest(root: Path | None = None) -> str:
    """sha1 (16 hex digits) of the package's source files, path by path: which code ran, also where
    `git_commit` cannot say (a copy of the tree whose .git is older than its files, as on the GPU
    machine in 2026-12-04's run3). The same digest for a checkout: `python -c "from
    adafuse_compile.bench import source_digest; print(source_digest())"`."""
    root = root or Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cu") and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# Entry point -----------------------------------------------------------------------------------

def run_bench(cfg: BenchConfig, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Run the benchmark; returns the result dict (schema in the module docstring).

    checkpoint: called with the result so far (summarized, "pending" listing what has not run) before
    the first method and after each one, e.g. to write partial outputs that survive a killed run."""
    t_start = time.perf_counter()
    t_budget = _now()
    spec = resolve(cfg)
    threads = cfg.threads or (1 if spec.device.type == "cpu" else None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = _run(cfg, spec, t_budget, t_start, checkpoint)
    finally:
        torch.set_num_threads(old_threads)
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    return result


def _run(cfg: BenchConfig, spec: Spec, t_budget: float, t_start: float,
         checkpoint: Callable[[dict], None] | None) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    lengths = prompt_lengths(spec.prompts, spec.seed, spec.max_prompt_len)
    prompts = make_prompts(lengths, spec.model["vocab_size"], spec.seed, spec.device)
    # One static cache size for every prompt: no reallocation, no recompilation between prompts.
    max_cache_len = int(math.ceil((max(lengths + [11]) + spec.new_tokens) / 64) * 64)
    loops = LOOPS if cfg.loop == "both" else (cfg.loop,)
    methods = [METHOD_BY_NAME[name] for name in (cfg.methods or RUN_ORDER)]
    mean_ctx = statistics.fmean(lengths) + spec.new_tokens / 2
    result = {
        "schema": SCHEMA,
        "env": environment(spec.device),
        "config": {
            "preset": spec.preset, "hf_config_path": spec.hf_config_path, "family": spec.family, "model": spec.model,
            "dtype": str(spec.dtype).removeprefix("torch."), "device": str(spec.device), "targets": cfg.targets,
            "target_modules": list(spec.adapters.target_modules),
            "adapters": {"num_experts": spec.adapters.num_experts, "rank": spec.adapters.rank,
                         "top_k": spec.adapters.top_k, "alpha": spec.adapters.alpha, "b_std": spec.b_std,
                         "weight_std": spec.weight_std},
            "prompts": spec.prompts, "new_tokens": spec.new_tokens, "loops": list(loops), "codegen": spec.codegen,
            "cudagraphs": spec.cudagraphs, "seed": spec.seed, "max_cache_len": max_cache_len,
            "prompt_distribution": {"kind": "lognormal", "median": PROMPT_MEDIAN, "sigma": PROMPT_SIGMA,
                                    "min": PROMPT_MIN, "max": min(PROMPT_MAX, spec.max_prompt_len), "seed": spec.seed},
            "prefill": spec.prefill, "hf_cache": spec.hf_cache, "hf_stop_check": spec.hf_stop_check,
            "hf_stop_check_effective": stop_check_mode(spec.device, spec.hf_stop_check == "deferred"), "method_budget_s": cfg.method_budget_s,
            "budget_s": cfg.budget_s,
            "run_order": [m.name for m in methods],
        },
        "prompt_lengths": lengths,
        "analytics": analytics(spec, mean_ctx),
        "results": [],
        "pending": [f"{loop}:{m.name}" for loop in loops for m in methods],
        "wall_s": None,
    }

    def save() -> None:
        if checkpoint is not None:
            summarize(result)
            result["wall_s"] = round(time.perf_counter() - t_start, 2)
            checkpoint(result)

    save()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not cfg.progress, transient=False) as bar:
        overall = bar.add_task("methods", total=len(loops) * len(methods))
        for loop in loops:
            for method in methods:
                task = bar.add_task(f"{loop}: {method.name}", total=spec.prompts)
                start = _now() - t_budget
                if cfg.budget_s is not None and start >= cfg.budget_s:
                    entry = _entry(method, loop, spec.prompts)
                    entry.update(status="skipped", reason=f"global time budget: {start:.1f} s of budget_s="
                                 f"{cfg.budget_s:g} s had passed when this method was to start")
                else:
                    entry = run_method(method, spec, loop, prompts, max_cache_len,
                                       on_prompt=lambda: bar.advance(task), budget_s=cfg.method_budget_s)
                    entry["start_s"] = round(start, 2)
                    entry["method_s"] = round(_now() - t_budget - start, 2)
                result["results"].append(entry)
                result["pending"].remove(f"{loop}:{method.name}")
                status = entry["status"]
                if status == "ok":
                    med = statistics.median(entry["decode_ms_per_token"])
                    served = f" ({_served(entry, spec.prompts)})" if entry["truncated_by_budget"] else ""
                    bar.update(task, total=entry["prompts_served"],
                               description=f"{loop}: {method.name} [green]{med:.2f} ms/token{served}")
                else:
                    bar.update(task, description=f"{loop}: {method.name} [red]{status}")
                bar.advance(overall)
                save()
    summarize(result)
    return result


# Outputs ---------------------------------------------------------------------------------------

def _fmt(v, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def _table_order(entries: list[dict]) -> list[dict]:
    """Entries in METHODS order (the paper's table layout), whatever order they ran in."""
    rank = {m.name: i for i, m in enumerate(METHODS)}
    return sorted(entries, key=lambda e: rank.get(e["method"], len(rank)))


def _served(e: dict, asked: int) -> str:
    """'12/50 (budget)' for a method the time budget stopped, '50/50' for a full one, '' if it did not run."""
    if e["status"] != "ok":
        return ""
    served = e.get("prompts_served", len(e["decode_ms_per_token"]))  # files from before the budgets
    return f"{served}/{e.get('prompts_asked', asked)}" + (" (budget)" if e.get("truncated_by_budget") else "")


def _step_diagnostics(entries: list[dict]) -> list[str]:
    """One line: each method's median first decode step (where a CUDA-graph recording lands) and,
    on the GPU, the CUDA graphs it recorded while its prompts were timed."""
    parts = []
    for e in _table_order(entries):
        first = e.get("first_decode_step_ms") or []
        if not first:
            continue
        part = f"{e['label']} {statistics.median(first):.2f} ms"
        if e.get("cudagraphs_recorded_while_timed") is not None:
            part += f" ({e['cudagraphs_recorded_while_timed']} CUDA graphs recorded while timed)"
        parts.append(part)
    return [f"First decode step of a prompt, median: {'; '.join(parts)}.", ""] if parts else []


def markdown_table(result: dict) -> str:
    """Paper Table 5 layout: method, ms/token, overhead vs backbone, peak memory, memory overhead."""
    env, cfg = result["env"], result["config"]
    where = env["gpu"] or f"CPU ({env['platform']})"
    budget, total = cfg.get("method_budget_s"), cfg.get("budget_s")
    lines = [f"# adafuse bench: {cfg['preset']}, adapted {cfg['targets']} ({', '.join(cfg['target_modules'])})", "",
             f"{where}; torch {env['torch']}, transformers {env['transformers']}; {cfg['dtype']}; "
             f"{cfg['prompts']} prompts{' asked' if budget is not None else ''} x {cfg['new_tokens']} new tokens, "
             f"batch 1, greedy; N={cfg['adapters']['num_experts']} experts, r={cfg['adapters']['rank']}, "
             f"top-{cfg['adapters']['top_k']}; "
             f"codegen {cfg['codegen']}, CUDA graphs {'on' if cfg['cudagraphs'] else 'off'}; prefill "
             f"{'eager (only the decode step is compiled)' if cfg.get('prefill') == 'eager' else 'compiled'}"
             + (f"; generate()'s KV cache {cfg['hf_cache']}" if "hf" in cfg["loops"] and cfg.get("hf_cache") else "")
             + (f"; generate()'s stop check: {cfg['hf_stop_check_effective']}"
                if "hf" in cfg["loops"] and cfg.get("hf_stop_check_effective") else "")
             + ".", ""]
    truncated = [e for e in result["results"] if e.get("truncated_by_budget")]
    skipped = [e for e in result["results"] if e["status"] == "skipped"]
    if truncated or skipped or result.get("pending"):
        why = []
        if budget is not None:
            why.append(f"a method stopped serving prompts once its measured prompts had taken {budget:g} s, "
                       f"after at least one")
        if total is not None:
            why.append(f"no method started after {total:g} s of the run")
        lines += [f"**Not the full {cfg['prompts']}-prompt protocol**: time budgets ({'; '.join(why) or 'none set'}). "
                  f"{len(truncated)} method(s) stopped early by their budget (column Prompts: served/asked), "
                  f"{len(skipped)} skipped by the global budget.", ""]
    if result.get("pending"):
        lines += [f"**Partial result**: the run had not finished when this was written; not run yet: "
                  f"{', '.join(result['pending'])}.", ""]
    for loop in cfg["loops"]:
        name = "Hugging Face generate()" if loop == "hf" else "own decode loop (TinyLlama)"
        lines += [f"## {name}", "",
                  "| Method | Prompts | ms/token (median) | p90 | Overhead vs backbone | Peak memory (GiB) "
                  "| Memory overhead | Params + | FLOPs/token + | Prefill ms (median) | Tokens = reference |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in _table_order([x for x in result["results"] if x["loop"] == loop]):
            if e["status"] != "ok":
                why = (e["reason"] or "").split("\n")[0][:120].replace("|", "/")
                lines.append(f"| {e['label']} | | {e['status']}: {why} | | | | | | | | |")
                continue
            s = e["summary"]
            over = "1.00 (reference)" if e["method"] == "backbone" else (
                "n/a" if s["overhead_pct"] is None else f"{s['x_backbone']:.2f} ({s['overhead_pct']:+.0f}%)")
            mem = None if e["peak_memory_bytes"] is None else e["peak_memory_bytes"] / 2**30
            match = "" if e["tokens_match_reference"] is None else f"{100 * e['tokens_match_reference']:.0f}%"
            parted = [i for i in e.get("tokens_first_difference") or [] if i is not None]
            if parted:
                match += f" (first difference at token {min(parted)})"
            label = e["label"]
            if (e["compile"] or {}).get("prefill", cfg["prefill"]) != cfg["prefill"]:
                label += f" [prefill {e['compile']['prefill']}]"  # regional layers: generate() cannot bypass them
            lines.append(
                f"| {label} | {_served(e, cfg['prompts'])} | {s['decode_ms_median']:.3f} | "
                f"{s['decode_ms_p90']:.3f} | {over} | {_fmt(mem)} | {_fmt(s['memory_overhead_pct'], '+.1f', '%')} | "
                f"{s['param_overhead_pct']:.2f}% | {s['flop_overhead_pct']:.2f}% | {s['prefill_ms_median']:.2f} | "
                f"{match} |")
        lines.append("")
        lines += _step_diagnostics([x for x in result["results"] if x["loop"] == loop and x["status"] == "ok"])
    lines += ["Overheads divide by 'backbone, compiled (reference)' of the same loop. Params + and FLOPs/token + are "
              "analytic (see the JSON's `analytics`). 'Tokens = reference': share of prompts whose greedy tokens "
              "equal those of the method's reference (backbone eager, MoLA eager or pre-gated eager), over the "
              "prompts both served; where some differ, the earliest new token (0-based) at which one of them "
              "parts from the reference. Prompts: prompts served / asked, each of "
              f"{cfg['new_tokens']} new tokens; '(budget)': the per-method time budget stopped the method there, "
              "so its medians are over those prompts only.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bars: ms/token per method (median, p90 as error bar); backbone as a horizontal line; per loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loops = result["config"]["loops"]
    fig, axes = plt.subplots(len(loops), 1, figsize=(11, 4.2 * len(loops)), squeeze=False)
    for ax, loop in zip(axes[:, 0], loops):
        entries = _table_order([e for e in result["results"] if e["loop"] == loop])
        names = [e["method"] + (f"\n{e['prompts_served']}/{e['prompts_asked']} prompts (budget)"
                                if e.get("truncated_by_budget") else "") for e in entries]
        vals = [e["summary"]["decode_ms_median"] if e["status"] == "ok" else 0.0 for e in entries]
        err = [(e["summary"]["decode_ms_p90"] - e["summary"]["decode_ms_median"]) if e["status"] == "ok" else 0.0
               for e in entries]
        colors = ["#4c72b0" if e["method"].startswith("adafuse") else "#999999" if e["kind"] == "backbone"
                  else "#dd8452" for e in entries]
        ax.bar(range(len(entries)), vals, yerr=[[0] * len(err), err], color=colors, capsize=3)
        for i, e in enumerate(entries):
            if e["status"] != "ok":
                ax.text(i, 0, e["status"], rotation=90, ha="center", va="bottom", fontsize=8, color="#c44e52")
        base = next((e for e in entries if e["method"] == "backbone" and e["status"] == "ok"), None)
        if base:
            ax.axhline(base["summary"]["decode_ms_median"], color="black", linestyle="--", linewidth=1,
                       label=f"backbone compiled {base['summary']['decode_ms_median']:.2f} ms/token")
            ax.legend(loc="upper right")
        ax.set_xticks(range(len(entries)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("decode ms/token (median; bar to p90)")
        title = "Hugging Face generate()" if loop == "hf" else "own decode loop"
        ax.set_title(f"{result['config']['preset']} {result['config']['targets']}: {title}, "
                     f"{result['env']['gpu'] or 'CPU'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, json_path: str | Path, png: bool = True) -> dict[str, Path]:
    """Write the JSON, the Markdown table (.md) and the plot (.png, unless png=False) side by side;
    returns their paths. Each file is written whole then renamed, so a killed run leaves the last
    complete version."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": json_path, "md": json_path.with_suffix(".md"), "png": json_path.with_suffix(".png")}
    for key, text in (("json", json.dumps(result, indent=1)), ("md", markdown_table(result))):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        try:
            tmp.write_text(text)
            tmp.replace(paths[key])
        finally:
            tmp.unlink(missing_ok=True)
    if png:
        plot(result, paths["png"])
    return paths


def default_output(cfg: BenchConfig) -> Path:
    device = cfg.device or PRESETS[cfg.preset].device
    return Path(f"bench_{cfg.preset}_{cfg.targets}_{device}.json")


__all__ = ["BenchConfig", "METHODS", "PRESETS", "RUN_ORDER", "SCHEMA", "markdown_table", "plot", "prompt_lengths",
           "run_bench", "write_outputs"]
