"""Sparse upcycling: the upcycled MoE computes the dense function at step 0, checked in our model and, after an
HF export, in transformers' Mixtral / Qwen2-MoE against transformers' own Llama."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice

import pytest
import torch

from moeformer.errors import ConfigError
from moeformer.models.checkpoint import read_model_config, save_pretrained
from moeformer.models.config import ModelConfig
from moeformer.models.model import CausalLM, from_pretrained
from moeformer.models.upcycle import upcycle, upcycled_config
from moeformer.training.config import load_config
from moeformer.training.data import ShardedBatches, TokenDataset, prepare_corpus
from moeformer.training.metrics import read_metrics
from tests.numerics import FP32_RTOL
from tests.test_hf_parity import build_hf
from tests.test_scripts import script
from tests.workers import REPO, worker_env

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


def test_upcycle_vs_dense_experiment_runs_end_to_end(tmp_path, monkeypatch):
    """scripts/upcycle_vs_dense.py with a tiny dense model, 4 + 4 steps on one process: both continuations start
    where the pretraining's data stopped, the upcycled model's step-0 validation loss is the dense checkpoint's
    (fp32, noise 0), and the report holds both validation curves at equal tokens with their difference."""
    data, out = tmp_path / "data", tmp_path / "runs"
    prepare_corpus(data, tokenizer="byte", max_files=6, val_fraction=0.3)
    flags = [
        "--pretrain-steps=4",
        "--steps=4",
        f"--out={out}",
        "--model.name=tiny-dense",
        "--model.n_layers=2",
        "--model.vocab_size=258",
        f"--data.dir={data}",
        "--data.seq_len=32",
        "--data.micro_batch_size=2",
        "--train.grad_accum=2",
        "--train.dtype=fp32",
        "--train.zero_stage=0",
        "--train.eval_every=2",
        "--train.eval_batches=2",
        "--train.log_every=1",
        "--train.progress_bar=false",
        "--optim.warmup_steps=1",
        "--checkpoint.every=0",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/upcycle_vs_dense.py"), *flags],
        capture_output=True,
        text=True,
        env=worker_env(OMP_NUM_THREADS="1"),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    pre, dense, moe = results["pretrain"], results["dense"], results["moe"]
    for phase in ("dense", "moe"):  # 4 steps x 2 global batches drawn by the pretraining
        assert load_config(out / phase / "config.yaml").data.start_batch == 8
    assert moe["params_total"] > dense["params_total"] == pre["params_total"]
    moe_config = read_model_config(out / "upcycled")
    assert (moe_config.moe.num_experts, moe_config.moe.top_k) == (8, 2) == (results["num_experts"], results["top_k"])

    table = results["table"]
    tokens_per_step = 2 * 2 * 32
    assert [r["step"] for r in table] == [0, 2, 4]
    assert [r["tokens"] for r in table] == [0, 2 * tokens_per_step, 4 * tokens_per_step]
    assert [r["tokens_since_init"] for r in table] == [4 * tokens_per_step + r["tokens"] for r in table]
    for r in table:
        assert r["moe_ahead_nats"] == pytest.approx(r["dense_val_loss"] - r["moe_val_loss"], abs=1e-12)
    start = table[0]
    # the dense continuation evaluates the exported weights the pretraining ended with: the same computation
    assert start["dense_val_loss"] == pytest.approx(pre["final_val_loss"], rel=1e-6)
    # the upcycled model computes the dense function: sums in another order only (tests/numerics.py)
    assert abs(start["moe_val_loss"] - start["dense_val_loss"]) <= FP32_RTOL * start["dense_val_loss"]
    assert table[-1]["moe_val_loss"] != table[-1]["dense_val_loss"]  # they trained apart

    # step 1 of both continuations: the pretrained function on global batches 8 and 9 (the weights change after both)
    model = from_pretrained(out / "pretrain" / "model").eval()
    batches = ShardedBatches(TokenDataset.from_dir(data, "train", 32), 2, seed=0)
    batches.seek(8)
    with torch.no_grad():
        want = sum(model(**batch, return_logits=False).ce_loss.item() for batch in islice(batches, 2)) / 2
    for phase in ("dense", "moe"):
        first = next(r for r in read_metrics(out / phase) if r["split"] == "train" and r["step"] == 1)
        assert abs(first["ce_loss"] - want) <= FP32_RTOL * want

    md = (out / "results.md").read_text()
    assert "| step | tokens | tokens since init | dense val loss | upcycled val loss | upcycled ahead (nats) |" in md
    assert f"| 4 | {4 * tokens_per_step:,} | {8 * tokens_per_step:,} |" in md
    assert f"{8 * tokens_per_step / pre['train_tokens']:.2f} epochs of the {pre['train_tokens']:,}-token train" in md
    assert (out / "loss.png").is_file()

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    (out / "moe" / "metrics.jsonl").unlink()
    with pytest.raises(SystemExit, match="no finished moe run"):
        script("upcycle_vs_dense").report(out)
