"""Quantized checkpoints: quantizing while loading equals quantizing after loading, a quantized native checkpoint
reloads bit for bit, loading quantized keeps peak memory near the quantized size, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import moeformer
from moeformer.errors import CheckpointError
from moeformer.models import ModelConfig, build_model
from tests.workers import worker_env


def tiny_moe(**overrides) -> ModelConfig:
    base = dict(n_layers=2, dim=64, n_heads=4, ffn_dim=128, moe={"ffn_dim": 64})
    return ModelConfig.from_name("tiny-moe", **{**base, **overrides})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    model = build_model(tiny_moe())
    for fmt in ("native", "hf"):
        model.save_pretrained(root / fmt, format=fmt)
    return root


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["native", "hf"])
@pytest.mark.parametrize("mode, group", [("int8", 128), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_while_loading_equals_quantize_after_loading(saved, fmt, mode, group, dtype):
    loaded = moeformer.from_pretrained(saved / fmt, dtype=dtype, quantize=mode, group_size=group)
    after = moeformer.quantize(moeformer.from_pretrained(saved / fmt, dtype=dtype), mode, group_size=group)
    assert loaded.config.quantization == after.config.quantization == {"mode": mode, "group_size": group}
    assert states_equal(loaded.state_dict(), after.state_dict())


@pytest.mark.parametrize("mode, group", [("int8", 128), ("int4", 32)])
def test_quantized_native_checkpoint_reloads_bit_exactly(saved, tmp_path, mode, group):
    model = moeformer.from_pretrained(saved / "native", dtype=torch.bfloat16, quantize=mode, group_size=group)
    model.save_pretrained(tmp_path / "q", format="native")
    again = moeformer.from_pretrained(tmp_path / "q")  # dtype from the checkpoint: the scales' bf16
    assert again.config.quantization == model.config.quantization
    assert states_equal(model.state_dict(), again.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(model(ids).logits, again(ids).logits)
    same_format = moeformer.from_pretrained(tmp_path / "q", quantize=mode, group_size=group)  # as saved: accepted
    assert states_equal(model.state_dict(), same_format.state_dict())


def test_quantized_checkpoint_refusals(saved, tmp_path):
    model = moeformer.from_pretrained(saved / "native", quantize="int8")
    with pytest.raises(ValueError, match="no Hugging Face format"):
        model.save_pretrained(tmp_path / "hf", format="hf")
    model.save_pretrained(tmp_path / "q8", format="native")
    with pytest.raises(CheckpointError, match="cannot be re-quantized to int4"):
        moeformer.from_pretrained(tmp_path / "q8", quantize="int4")
    with pytest.raises(ValueError, match="int3"):
        moeformer.from_pretrained(saved / "native", quantize="int3")
    with pytest.raises(ValueError, match="group"):
        moeformer.from_pretrained(saved / "native", quantize="int4", group_size=48)


PEAK = """
import sys, torch, moeformer

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

moeformer.from_pretrained(sys.argv[3], quantize=sys.argv[2] or None, group_size=64)  # first-call set-up, untimed
open("/proc/self/clear_refs", "w").write("5")  # the peak resident size restarts from the current one
base = kib("VmRSS")
model = moeformer.from_pretrained(sys.argv[1], quantize=sys.argv[2] or None, group_size=64)
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print((kib("VmHWM") - base) * 1024, size)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
def test_loading_quantized_keeps_peak_memory_near_the_quantized_size(tmp_path):
    """fp32 checkpoint of ~100 MB (8 MB per expert stack): loading it as int4 must peak far below loading it whole,
    near the quantized model plus one full-precision tensor (the largest, one layer's expert stack)."""
    config = tiny_moe(n_layers=6, dim=512, vocab_size=1024, ffn_dim=512, moe={"ffn_dim": 512, "num_experts": 8})
    torch.manual_seed(0)
    build_model(config).save_pretrained(tmp_path / "ck", format="native", max_shard_size="30MB")
    build_model(tiny_moe(n_layers=1)).save_pretrained(tmp_path / "small", format="native")
    full_bytes = sum(f.stat().st_size for f in (tmp_path / "ck").glob("*.safetensors"))

    def peak(mode: str) -> tuple[int, int]:
        done = subprocess.run(
            [sys.executable, "-c", PEAK, str(tmp_path / "ck"), mode, str(tmp_path / "small")],
            env=worker_env(MALLOC_MMAP_THRESHOLD_="1048576"),  # freed tensors leave at once
            capture_output=True,
            text=True,
            check=True,
        )
        return tuple(int(v) for v in done.stdout.split())

    full_peak, _ = peak("")
    int4_peak, int4_size = peak("int4")
    largest = 4 * 8 * 512 * 2 * 512  # one layer's w_in stack in fp32
    assert full_peak > 0.9 * full_bytes
    assert int4_size < 0.2 * full_bytes
    assert int4_peak < int4_size + 2 * largest + 16 * 2**20, json.dumps(
        {"int4_peak": int4_peak, "int4_size": int4_size, "largest": largest, "full": full_bytes}
    )
