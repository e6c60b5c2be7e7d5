"""Checkpoint I/O: native round trips, sharding, atomic saves, clear errors, peak memory, the convert script,
the zoo configs of the HF families, and the pooled HF router loss."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeformer.models import checkpoint
from moeformer.models.checkpoint import parse_size, save_pretrained
from moeformer.models.config import ModelConfig
from moeformer.models.hf import FAMILIES, family_for_config, get_family
from moeformer.models.model import CausalLM, from_pretrained
from moeformer.models.params import count_params
from tests.hf_aux_loss import hf_load_balancing_loss
from tests.workers import REPO, worker_env

ENV = worker_env()


def tiny_model(**overrides) -> CausalLM:
    base = dict(
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        max_seq_len=32,
        moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16},
    )
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**{**base, **overrides}))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def logits(model: CausalLM, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = torch.arange(10).view(1, 10) % model.config.vocab_size if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_native_round_trip_keeps_weights_buffers_and_ties(tmp_path, tied):
    model = tiny_model(
        tie_embeddings=tied,
        attention_types=["mla"],
        mla={"q_lora_rank": 8, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8},
        head_dim=12,
        moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16, "router": "sigmoid", "router_bias": True},
    )
    model.layers[0].mlp.router.expert_bias.copy_(torch.randn(4))
    save_pretrained(model, tmp_path / "ck", format="native")
    assert (tmp_path / "ck" / "config.yaml").is_file()
    loaded = from_pretrained(tmp_path / "ck")
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(loaded.layers[0].mlp.router.expert_bias, model.layers[0].mlp.router.expert_bias)
    assert (loaded.lm_head.weight is loaded.tok_embeddings.weight) == tied
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    stored = load_file(tmp_path / "ck" / "model.safetensors")
    assert ("lm_head.weight" in stored) != tied


def test_sharded_save_and_dtype_change(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "ck", max_shard_size="10KB", dtype=torch.bfloat16)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / "ck" / s).is_file() for s in shards)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = from_pretrained(tmp_path / "ck")
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight.bfloat16())
    as_fp32 = from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert (logits(as_fp32) - logits(model)).abs().max() < 0.05


def tiny_deepseek() -> CausalLM:
    mla = {"q_lora_rank": None, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
    return tiny_model(
        attention_types=["mla"],
        mla=mla,
        head_dim=12,
        first_k_dense=1,
        moe={
            "num_experts": 4,
            "top_k": 2,
            "ffn_dim": 16,
            "router": "sigmoid",
            "router_bias": True,
            "num_shared_experts": 1,
        },
    )


def test_deepseek_multi_token_prediction_layers_are_skipped(tmp_path):
    model = tiny_deepseek()
    save_pretrained(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == "deepseek_v3"
    rewrite(tmp_path / "ck" / "model.safetensors", lambda t: t.update({"model.layers.2.eh_proj.weight": torch.ones(2)}))
    assert torch.equal(logits(from_pretrained(tmp_path / "ck")), logits(model))


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 quantization as DeepSeek-V3 stores it: e4m3 values and one inverse scale per tile."""
    rows, cols = weight.shape
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(tiles[0] * block[0], tiles[1] * block[1])
    padded[:rows, :cols] = weight.abs()
    scale = padded.view(tiles[0], block[0], tiles[1], block[1]).amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight / full).to(torch.float8_e4m3fn), scale


def test_fp8_block_quantized_deepseek_weights_are_dequantized(tmp_path):
    model = tiny_deepseek()
    save_pretrained(model, tmp_path / "ck")
    block, quantized = (4, 3), {}

    def quantize(tensors):
        for name in [n for n in tensors if n.endswith(("kv_b_proj.weight", "w1.weight")) or ".experts." in n]:
            tensors[name], tensors[f"{name}_scale_inv"] = quantize_fp8(tensors[name], block)
            quantized[name] = (
                tensors[name].float()
                * tensors[f"{name}_scale_inv"]
                .repeat_interleave(block[0], 0)[: tensors[name].shape[0]]
                .repeat_interleave(block[1], 1)[:, : tensors[name].shape[1]]
            )

    rewrite(tmp_path / "ck" / "model.safetensors", quantize)
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    with pytest.raises(ValueError, match="weight_block_size"):
        from_pretrained(tmp_path / "ck")
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    config_path.write_text(json.dumps(config))
    loaded = from_pretrained(tmp_path / "ck")
    assert torch.equal(loaded.layers[1].attn.kv_b_proj.weight, quantized["model.layers.1.self_attn.kv_b_proj.weight"])
    w_in = loaded.layers[1].mlp.experts.w_in
    assert torch.equal(w_in[2, :, :16], quantized["model.layers.1.mlp.experts.2.gate_proj.weight"].t())
    err = (logits(loaded) - logits(model)).abs().max()
    assert 0 < err < 0.1  # FP8 rounding, nothing worse
    save_pretrained(loaded, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_gpu(tmp_path):
    model = tiny_model(moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16, "router": "sigmoid", "router_bias": True})
    save_pretrained(model, tmp_path / "ck", format="native")
    gpu = from_pretrained(tmp_path / "ck", device="cuda")
    assert all(t.is_cuda for t in list(gpu.parameters()) + list(gpu.buffers()))
    ids = torch.arange(10).view(1, 10)
    assert (logits(gpu, ids.cuda()).cpu() - logits(model, ids)).abs().max() < 1e-3


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="parse size"):
        parse_size("lots")
    with pytest.raises(ValueError, match="positive"):
        parse_size(0)


# ---- atomic saves --------------------------------------------------------------------------


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old, new = tiny_model(), tiny_model(tie_embeddings=True)
    save_pretrained(old, tmp_path / "ck", max_shard_size="10KB")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(new, tmp_path / "ck", max_shard_size="10KB")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind
    assert torch.equal(logits(from_pretrained(tmp_path / "ck")), logits(old))

    monkeypatch.undo()
    save_pretrained(new, tmp_path / "ck")  # a complete save replaces it
    assert not (tmp_path / "ck" / "model.safetensors.index.json").exists()
    assert torch.equal(logits(from_pretrained(tmp_path / "ck")), logits(new))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_save_refuses_to_replace_a_non_checkpoint_directory(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a checkpoint"):
        save_pretrained(tiny_model(), tmp_path / "notes")
    with pytest.raises(ValueError, match="format"):
        save_pretrained(tiny_model(), tmp_path / "x", format="gguf")


def test_export_rejects_what_hf_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="layernorm"):
        save_pretrained(tiny_model(norm="layernorm"), tmp_path / "x")
    with pytest.raises(ValueError, match="mixtral.* needs softmax"):
        save_pretrained(
            tiny_model(
                moe={
                    "num_experts": 4,
                    "top_k": 2,
                    "ffn_dim": 16,
                    "router": "expert_choice",
                    "dispatcher": "capacity",
                    "capacity_factor": 1.0,
                }
            ),
            tmp_path / "y",
        )


# ---- clear errors --------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    save_pretrained(tiny_model(), tmp_path / "ck")
    return tmp_path / "ck"


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_files(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "empty")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(hf_dir)


def test_missing_shard(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "ck", max_shard_size="10KB")
    shard = sorted((tmp_path / "ck").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard.name} listed"):
        from_pretrained(tmp_path / "ck")


def test_unknown_model_type(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(KeyError, match="gpt_neox.*supported: deepseek_v2, deepseek_v3, llama, mixtral"):
        from_pretrained(hf_dir)


def test_missing_and_unexpected_tensors_are_listed(hf_dir):
    def edit(t):
        del t["model.layers.1.self_attn.k_proj.weight"]
        t["model.layers.0.mlp.bogus.weight"] = torch.zeros(2)

    rewrite(hf_dir / "model.safetensors", edit)
    with pytest.raises(
        ValueError,
        match=r"1 missing tensor\(s\): model.layers.1.self_attn.k_proj.weight; "
        r"1 unexpected tensor\(s\): model.layers.0.mlp.bogus.weight",
    ):
        from_pretrained(hf_dir)


def test_shape_mismatch_names_tensor_and_shapes(hf_dir):
    rewrite(hf_dir / "model.safetensors", lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint \(31,\) vs model \(32,\)"):
        from_pretrained(hf_dir)
    expert = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    rewrite(
        hf_dir / "model.safetensors",
        lambda t: t.update({"model.norm.weight": torch.ones(32), expert: torch.ones(16, 30)}),
    )
    with pytest.raises(ValueError, match=r"experts.3.w1.weight: checkpoint \(16, 30\) vs model \(16, 32\)"):
        from_pretrained(hf_dir)


def test_truncated_shard(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        from_pretrained(hf_dir)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        from_pretrained(hf_dir)


def test_bad_config_values_are_reported(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    del config["hidden_size"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="hidden_size"):
        from_pretrained(hf_dir)
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_pretrained(hf_dir)


# ---- memory --------------------------------------------------------------------------------

# Building any model on the meta device first imports torch's meta kernels (~80 MB, independent of model size);
# that one-time cost is paid before the baseline so the measurement is the growth due to the checkpoint.
MEMORY_PROBE = textwrap.dedent("""
    import sys, torch
    from moeformer.models.model import from_pretrained
    from moeformer.models.config import ModelConfig
    from moeformer.models.model import CausalLM
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    with torch.device("meta"):
        CausalLM(ModelConfig(moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16}))
    base = status("VmRSS")
    model = from_pretrained(sys.argv[1])
    print(status("VmHWM") - base, sum(p.numel() * p.element_size() for p in model.parameters()))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_loading_peaks_near_one_copy_of_the_weights(tmp_path):
    """~200 MB MoE checkpoint in HF layout (per-expert tensors fused on load): RSS growth < 1.3x its size."""
    config = ModelConfig(
        vocab_size=4096,
        dim=512,
        n_layers=4,
        n_heads=8,
        ffn_dim=1024,
        max_seq_len=64,
        moe={"num_experts": 8, "top_k": 2, "ffn_dim": 1024},
    )
    with torch.no_grad():
        model = CausalLM(config)
    save_pretrained(model, tmp_path / "big", max_shard_size="80MB")
    del model
    size = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert 180e6 < size < 260e6
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big")], env=ENV, capture_output=True, text=True, check=True
    )
    growth, weights = map(int, out.stdout.split())
    assert weights > 0.95 * size
    assert growth < 1.3 * size, f"RSS grew {growth / 1e6:.0f} MB loading {size / 1e6:.0f} MB"


# ---- command line --------------------------------------------------------------------------


def test_convert_script_hf_to_native_to_hf(tmp_path):
    model = tiny_model(
        attn_bias=True,
        moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16, "num_shared_experts": 1, "shared_expert_gate": True},
    )
    save_pretrained(model, tmp_path / "hf")
    script = str(REPO / "scripts" / "convert.py")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, *args], env=ENV, capture_output=True, text=True)

    done = run(str(tmp_path / "hf"), str(tmp_path / "native"), "--to", "native", "--dtype", "bf16")
    assert done.returncode == 0, done.stderr
    assert "wrote native checkpoint" in done.stdout
    done = run(str(tmp_path / "native"), str(tmp_path / "hf2"), "--to", "hf", "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["model_type"] == "qwen2_moe"
    back = from_pretrained(tmp_path / "hf2")
    assert torch.equal(back.tok_embeddings.weight, model.tok_embeddings.weight.bfloat16().float())
    failed = run(str(tmp_path / "missing"), str(tmp_path / "x"))
    assert failed.returncode != 0 and "does not exist" in failed.stderr


# ---- zoo configs of the HF families --------------------------------------------------------

PUBLISHED = {  # name: (HF model_type, total, active) as published
    "olmoe-1b-7b": ("olmoe", 6.9e9, 1.3e9),
    "qwen2-moe-a2.7b": ("qwen2_moe", 14.3e9, 2.7e9),
    "qwen3-30b-a3b": ("qwen3_moe", 30.5e9, 3.3e9),
    "deepseek-v3": ("deepseek_v3", 671e9, 37e9),
    "deepseek-v2-lite": ("deepseek_v2", 15.7e9, 2.4e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_zoo_config_matches_published_size_and_transformers(name):
    model_type, total, active = PUBLISHED[name]
    config = ModelConfig.from_name(name)
    counts = count_params(config)
    assert abs(counts.total / total - 1) < 0.01, counts
    # published active counts are rounded to 2 digits, and DeepSeek-V2's leaves out the input embedding table
    lookup = config.vocab_size * config.dim if model_type == "deepseek_v2" else 0
    assert abs((counts.active - lookup) / active - 1) < 0.03, counts
    family = family_for_config(config)
    hf = family.config_to_hf(config)
    assert hf["model_type"] == model_type
    assert architecture(family.config_from_hf(hf)) == architecture(config)


def architecture(config: ModelConfig) -> dict:
    """Config fields that shape the network (not its name, init or training losses)."""
    d = config.to_dict()
    for key in ("name", "extra", "init_std", "attn_backend", "loss_chunk_size"):
        d.pop(key)
    for key in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate", "backend", "dispatcher"):
        d["moe"].pop(key)
    return d


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_zoo_config_builds_same_size_transformers_model(name):
    transformers = pytest.importorskip("transformers")
    config = ModelConfig.from_name(name)
    hf_config = transformers.AutoConfig.for_model(**family_for_config(config).config_to_hf(config))
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in hf_model.parameters()) == count_params(config).total


# Architecture keys of published config.json files, in their pre-transformers-5 spelling (rope_theta and
# rope_scaling at top level, no qkv_bias key for Qwen2-MoE).
PUBLISHED_CONFIG_JSON = {
    "deepseek-v3": dict(
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        first_k_dense_replace=3,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        hidden_act="silu",
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        rope_theta=10000,
        rope_scaling={
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        tie_word_embeddings=False,
    ),
    "qwen2-moe-a2.7b": dict(
        model_type="qwen2_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_experts=60,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        max_position_embeddings=8192,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=False,
        use_sliding_window=False,
        router_aux_loss_coef=0.001,
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIG_JSON))
def test_published_config_json_maps_to_the_zoo_config(name):
    hf = PUBLISHED_CONFIG_JSON[name]
    assert architecture(get_family(hf["model_type"]).config_from_hf(hf)) == architecture(ModelConfig.from_name(name))


def test_registry_and_family_choice():
    assert set(FAMILIES) == {"llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2"}
    assert get_family("deepseek_v2") is get_family("deepseek_v3")
    assert family_for_config(ModelConfig(moe=None)).model_types == ("llama",)
    assert family_for_config(tiny_model(qk_norm="head").config).model_types == ("qwen3_moe",)
    assert family_for_config(tiny_model().config).model_types == ("mixtral",)


# ---- pooled HF router loss -----------------------------------------------------------------


def test_hf_load_balancing_loss_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    layers = [torch.randn(2 * 7, 6) for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    ref = load_balancing_loss_func(tuple(layers), 6, 2)
    assert torch.allclose(hf_load_balancing_loss(layers, 2), ref, atol=1e-6)
    ref_masked = load_balancing_loss_func(tuple(layers), 6, 2, attention_mask=mask.long())
    assert torch.allclose(hf_load_balancing_loss(layers, 2, token_mask=mask), ref_masked, atol=1e-6)
    assert not torch.allclose(ref, ref_masked)
    with pytest.raises(ValueError, match="at least one"):
        hf_load_balancing_loss([], 2)
