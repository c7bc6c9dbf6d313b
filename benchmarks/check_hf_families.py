"""Does adafuse work on Hugging Face causal-LM families beyond the three the tests cover? On the CPU.

For each family of `presets.OTHER_HF_FAMILIES` (tiny random configs, no download; fp32), with
adapters on the family's own linear names: eager generate() with the adapters works and changes
the logits; the compiled model (backend "adafuse") gives the same greedy tokens and logits within
1e-4 through generate() with a static cache; which path each compiled graph took (or why it was
not rewritten); the adafuse warnings; and whether the model's state_dict is unchanged afterwards.
One JSON row per family:

    python benchmarks/check_hf_families.py --out benchmarks/results/hf_families_cpu.json
    python benchmarks/check_hf_families.py --families phi3,gemma2 --codegen inductor --out /tmp/f.json
    python benchmarks/check_hf_families.py --routing layerwise --out benchmarks/results/hf_families_cpu_layerwise.json

--routing layerwise puts a router in every adapted linear (router_placement="every_adapted"):
every compiled graph must then take the gather path.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import adafuse_compile as af
from adafuse_compile import backend
from adafuse_compile.presets import OTHER_HF_FAMILIES, tiny_hf_model

NEW_TOKENS = 8


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def check(family: str, codegen: str, routing: str = "pregated") -> dict:
    row: dict = {"family": family, "codegen": codegen, "routing": routing,
                 "targets": list(OTHER_HF_FAMILIES[family]["targets"])}
    t0 = time.time()
    model = tiny_hf_model(family)
    model.generation_config.eos_token_id = None  # fixed-length greedy outputs
    model.generation_config.cache_implementation = "static"
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone = model.generate(prompt, **kw)
            af.inject(model, af.AdaFuseConfig(
                num_experts=4, rank=4, alpha=16, init_lora_b="normal", target_modules=OTHER_HF_FAMILIES[family]["targets"],
                router_placement="every_adapted" if routing == "layerwise" else "first_adapted"))
            row["adapted_linears"] = len(af.adapted_linears(model))
            row["router_at"] = af.gate_channel(model).router_at
            eager = model.generate(prompt, **kw)
            row["adapter_logit_change"] = rel_err(torch.stack(eager.logits), torch.stack(backbone.logits))
            before = {k: v.clone() for k, v in model.state_dict().items()}
            torch._dynamo.reset()
            first = len(backend.last_compilations)
            model.compile(backend="adafuse", options={"codegen": codegen})
            compiled = model.generate(prompt, **kw)
            row["tokens_equal"] = torch.equal(compiled.sequences, eager.sequences)
            row["max_rel_logit_err"] = rel_err(torch.stack(compiled.logits), torch.stack(eager.logits))
            row["graphs"] = [{"path": r["path"], "regions": len(r["regions"]),
                              "tokens": sorted({str(x["tokens_per_step"]) for x in r["regions"]}),
                              "failed": r.get("failed"), "last_note": r["notes"][-1] if r["notes"] else None}
                             for r in backend.last_compilations[first:]]
            after = model.state_dict()
            row["state_dict_unchanged"] = all(torch.equal(after[k], v) for k, v in before.items())
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            torch._dynamo.reset()
    row["adafuse_warnings"] = sorted({str(w.message)[:400] for w in caught if "adafuse" in str(w.message)})
    row["ok"] = ("error" not in row and row.get("tokens_equal") is True and row["max_rel_logit_err"] <= 1e-4
                 and row["state_dict_unchanged"] and row["adapter_logit_change"] > 0
                 and any(g["path"] for g in row["graphs"]) and not row["adafuse_warnings"])
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(OTHER_HF_FAMILIES), help="comma-separated, of "
                    f"{sorted(OTHER_HF_FAMILIES)}")
    ap.add_argument("--codegen", default="eager", choices=("eager", "inductor"))
    ap.add_argument("--routing", default="pregated", choices=("pregated", "layerwise"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    families = args.families.split(",")
    unknown = sorted(set(families) - set(OTHER_HF_FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; known: {sorted(OTHER_HF_FAMILIES)}")
    import transformers

    rows = []
    for family in families:
        rows.append(check(family, args.codegen, args.routing))
        print(json.dumps({k: rows[-1].get(k) for k in ("family", "ok", "error", "max_rel_logit_err", "seconds")}),
              flush=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "device": "cpu",
                       "dtype": "float32", "new_tokens": NEW_TOKENS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
