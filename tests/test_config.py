import pytest
import torch

from adafuse_compile import LLAMA_LINEARS, AdaFuseConfig, AdaFuseConfigError, TinyLlama, TinyLlamaConfig, inject


def test_defaults_and_all_linear():
    cfg = AdaFuseConfig()
    assert cfg.top_k == 2 and cfg.target_modules == ("q_proj", "v_proj")
    assert AdaFuseConfig(target_modules="all-linear").target_modules == LLAMA_LINEARS
    assert AdaFuseConfig(rank=16, alpha=32).scaling == 2.0
    assert AdaFuseConfig(rank=16).scaling == 1.0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_experts=2, top_k=3), "top_k=3 exceeds num_experts=2"),
        (dict(rank=0), "rank must be a positive int"),
        (dict(rank=-4), "rank must be a positive int"),
        (dict(num_experts=0), "num_experts"),
        (dict(target_modules=()), "target_modules is empty"),
        (dict(target_modules=("q_proj", "q_proj")), "duplicates"),
        (dict(dropout=1.5), "dropout"),
        (dict(dtype="float8"), "dtype"),
        (dict(dtype=torch.int8), r"dtype=torch.int8 is not one of"),
        (dict(router_placement="every_layer"), "router_placement"),
        (dict(alpha=0.0), "alpha"),
    ],
)
def test_invalid_config_names_the_problem(kwargs, fragment):
    with pytest.raises(AdaFuseConfigError, match=fragment):
        AdaFuseConfig(**kwargs)


def test_dtype_as_a_torch_dtype_is_kept_by_name():
    cfg = AdaFuseConfig(dtype=torch.bfloat16)
    assert cfg.dtype == "bfloat16" and cfg.torch_dtype is torch.bfloat16
    assert cfg == AdaFuseConfig(dtype="bfloat16") and AdaFuseConfig.from_json(cfg.to_json()) == cfg


def test_json_round_trip(tmp_path):
    cfg = AdaFuseConfig(num_experts=4, rank=8, alpha=16, target_modules="all-linear", dropout=0.1, dtype="bfloat16")
    assert AdaFuseConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert AdaFuseConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(AdaFuseConfigError, match="unknown AdaFuseConfig fields"):
        AdaFuseConfig.from_dict({**cfg.to_dict(), "experts": 3})


def test_unknown_target_module_lists_available():
    model = TinyLlama(TinyLlamaConfig(num_hidden_layers=1))
    with pytest.raises(AdaFuseConfigError, match=r"\['query'\] match no nn.Linear.*the linears of this model are "
                                                 r"\['down_proj'.*e\.g\. target_modules=\('down_proj'"):
        inject(model, AdaFuseConfig(target_modules=("q_proj", "query")))


def test_all_linear_on_another_family_says_what_it_means_and_what_to_name():
    from adafuse_compile.presets import tiny_hf_model

    model = tiny_hf_model("phi3")
    with pytest.raises(AdaFuseConfigError, match=r"'all-linear' names the seven linears of a Llama block.*not every "
                                                 r"linear.*e\.g\. target_modules=\('down_proj', 'gate_up_proj', "
                                                 r"'o_proj', 'qkv_proj'\)"):
        inject(model, AdaFuseConfig(target_modules="all-linear"))
    assert not any(hasattr(p, "_adafuse_tag") for p in model.parameters())  # nothing changed


def test_double_injection_is_refused():
    model = TinyLlama(TinyLlamaConfig(num_hidden_layers=1))
    inject(model, AdaFuseConfig())
    with pytest.raises(AdaFuseConfigError, match="already has AdaFuse adapters"):
        inject(model, AdaFuseConfig())
