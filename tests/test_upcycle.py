"""Sparse upcycling: the upcycled MoE computes the dense function at step 0, checked in our model and, after an
HF export, in transformers' Mixtral / Qwen2-MoE against transformers' own Llama."""

from __future__ import annotations

import json

import pytest
import torch

from moeformer.errors import ConfigError
from moeformer.models.checkpoint import save_pretrained
from moeformer.models.config import ModelConfig
from moeformer.models.model import CausalLM, from_pretrained
from moeformer.models.upcycle import upcycle, upcycled_config
from tests.numerics import FP32_RTOL
from tests.test_hf_parity import build_hf
from tests.test_scripts import script

transformers = pytest.importorskip("transformers")


upcycle_script = script("upcycle")


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 logits of the same function computed with sums in another order (tests/numerics.py)."""
    assert (got - want).abs().max() <= FP32_RTOL * want.abs().max()


def dense_model(**overrides) -> CausalLM:
    config = ModelConfig.from_name(
        "tiny-dense", n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64, **overrides
    )
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    with torch.no_grad():  # norms away from one, so a lost or misplaced tensor shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared-expert"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_upcycled_model_computes_the_dense_function(shared, activation):
    dense = dense_model(activation=activation)
    moe = upcycle(dense, num_experts=4, top_k=2, shared_expert=shared, generator=torch.Generator().manual_seed(2))
    assert all(block.is_moe for block in moe.layers) and moe.config.moe.num_experts == 4
    x = tokens()
    with torch.no_grad():
        want, got = dense(x).logits, moe(x).logits
    # the MoE output is sum_k w_k * MLP(x) with sum_k w_k = 1: a few roundings away from MLP(x)
    assert_close_to_scale(got, want)
    routing = moe.layers[0].mlp.router.weight
    assert routing.std() > 0  # routers start random, not tied
    experts = moe.layers[0].mlp.experts.w_in
    assert torch.equal(experts[0], experts[3])  # no noise: identical copies


def test_noise_perturbs_each_expert_by_the_stated_scale():
    dense = dense_model()
    moe = upcycle(dense, num_experts=4, top_k=2, noise=0.1, generator=torch.Generator().manual_seed(3))
    w_in = moe.layers[1].mlp.experts.w_in
    copy = torch.cat([dense.layers[1].mlp.gate_proj.weight.t(), dense.layers[1].mlp.up_proj.weight.t()], dim=1)
    deltas = w_in - copy
    # Gaussian noise of std 0.1 * std(weight): over 3,072 draws per expert the sample std is within 10%
    ratio = deltas.flatten(1).std(dim=1) / (0.1 * copy.std())
    assert torch.all((ratio > 0.9) & (ratio < 1.1)), ratio
    assert not torch.equal(w_in[0], w_in[1])


def test_errors_name_the_problem():
    dense = dense_model()
    with pytest.raises(ConfigError, match="top_k"):
        upcycle(dense, num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="already a mixture of experts"):
        upcycled_config(ModelConfig.from_name("tiny-moe"), 4, 2)
    with pytest.raises(ConfigError, match="MLP biases"):
        upcycle(dense_model(mlp_bias=True), num_experts=2, top_k=1)
    with pytest.raises(ConfigError, match="noise"):
        upcycle(dense, num_experts=2, top_k=1, noise=-1.0)


def hf_llama(tmp_path):
    model = build_hf("llama", dict(vocab_size=64, num_hidden_layers=2))
    model.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return model


@pytest.mark.parametrize("shared,architecture", [(False, "MixtralForCausalLM"), (True, "Qwen2MoeForCausalLM")])
def test_hf_llama_upcycles_to_an_hf_moe_with_the_same_logits(tmp_path, shared, architecture, capsys):
    llama = hf_llama(tmp_path)
    args = [str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4", "--top-k", "2", "--to", "hf"]
    upcycle_script.main(args + (["--shared-expert"] if shared else []))
    assert "wrote hf MoE checkpoint" in capsys.readouterr().out
    hf_config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert hf_config["architectures"] == [architecture]
    assert (tmp_path / "moe" / "tokenizer_config.json").is_file()  # the tokenizer files travel with the weights
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", attn_implementation="eager").eval()
    x = tokens()
    with torch.no_grad():
        want, got = llama(x).logits, moe(x).logits
    assert_close_to_scale(got, want)
    ours = from_pretrained(tmp_path / "moe")  # and it reads back into ours, ready for model.init_from
    with torch.no_grad():
        assert_close_to_scale(ours(x).logits, want)


def test_script_reports_a_moe_source_in_one_line(tmp_path, capsys):
    save_pretrained(CausalLM(ModelConfig.from_name("tiny-moe", n_layers=1)), tmp_path / "moe", format="native")
    with pytest.raises(SystemExit) as exit_info:
        upcycle_script.main([str(tmp_path / "moe"), str(tmp_path / "out"), "--num-experts", "4", "--top-k", "2"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "already a mixture of experts" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
