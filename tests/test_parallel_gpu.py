"""The parity checks of tests/test_parallel.py on GPUs with NCCL (one GPU per rank): ep=2, tp=2, pp=2 on 2 GPUs and
ep=2 x dp=2, tp=2 x dp=2, pp=2 x dp=2 on 4 GPUs; and, on one GPU, what the pipeline engine asks of compiled
kernels. Skipped without enough CUDA devices."""

from __future__ import annotations

import pytest
import torch

from moeformer.parallel.groups import free_port
from tests.test_parallel import (
    assert_expert_layer,
    assert_expert_parallel_moe_layer,
    assert_layout,
    assert_pipeline,
    launch,
    packed,
    tiny_config,
)

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]


def needs_gpus(n: int):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPU(s)")


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory):
    return launch("two_ranks", 2, tmp_path_factory.mktemp("parallel_gpu") / "two.json", gpus=True)


@pytest.fixture(scope="module")
def four_gpus(tmp_path_factory):
    return launch("four_ranks", 4, tmp_path_factory.mktemp("parallel_gpu") / "four.json", gpus=True)


@needs_gpus(2)
@pytest.mark.parametrize("key", ["ep2", "ep2_all_to_all", "tp2", "tp2_mqa_tied", "tp2_expert_tp"])
def test_layouts_match_single_gpu(two_gpus, key):
    assert_layout(two_gpus[key], stages=(0, 2) if key.startswith("ep2") else (0,))


@needs_gpus(2)
@pytest.mark.parametrize("key", ["pp2", "pp2_tied"])
def test_pipeline_matches_single_gpu(two_gpus, key):
    assert_pipeline(two_gpus[key])


@needs_gpus(2)
def test_expert_parallel_layer_on_gpus(two_gpus):
    assert_expert_layer(two_gpus["expert_layer"])


@needs_gpus(2)
def test_expert_parallel_moe_layer_with_triton_kernels_matches_one_gpu(two_gpus):
    """The token-major Triton path (permute, weighted SwiGLU, combine) and the grouped GEMM on both GPUs under
    ep=2, NCCL all-to-alls in 1, 2 and 4 blocks overlapped with the shared expert and the expert GEMMs, against
    the layer on one GPU (also at 2 x 2048 tokens per GPU, 16 experts, d=256, fp32 and bf16)."""
    assert_expert_parallel_moe_layer(two_gpus["expert_parallel_moe_layer"])


@needs_gpus(4)
@pytest.mark.parametrize("key", ["ep2_dp2", "tp2_dp2", "ep2_tp2"])
def test_layouts_times_data_parallel_on_four_gpus(four_gpus, key):
    assert_layout(four_gpus[key])


@needs_gpus(4)
@pytest.mark.parametrize("key", ["pp2_dp2", "pp2_tp2_tied"])
def test_pipeline_times_data_or_tensor_parallel_on_four_gpus(four_gpus, key):
    assert_pipeline(four_gpus[key])


@needs_gpus(1)
def test_pipeline_lets_compiled_flex_attention_backpropagate_twice(monkeypatch):
    """DeepSpeed's pipeline engine backpropagates stage outputs with retain_graph=True, which a compiled graph that
    donates its saved buffers refuses. After `to_pipeline`, a model whose packed documents go through the compiled
    FlexAttention kernel must give the same gradients twice through one graph."""
    from torch._functorch import config as functorch_config

    from moeformer.models.model import build_model
    from moeformer.parallel import init_distributed, shutdown_distributed
    from moeformer.parallel.pipeline import to_pipeline

    monkeypatch.setattr(functorch_config, "donated_buffer", True)  # torch's default; restored afterwards
    for name, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(name, value)  # a world of one, without leaving it in this process's environment
    torch.manual_seed(0)
    init_distributed()
    try:
        model = build_model(tiny_config(attn_backend="flex"), device="cuda")
        to_pipeline(model, 1)
        params = list(model.parameters())
        for length in (16, 24, 40):  # new lengths recompile the kernel, the later ones with dynamic shapes
            ids, positions, documents = packed(torch.randint(0, 64, (2, length), device="cuda"))
            loss = model(ids, targets=ids, position_ids=positions, document_ids=documents).loss
            first = torch.autograd.grad(loss, params, retain_graph=True)
            second = torch.autograd.grad(loss, params)
            assert max(g.abs().max().item() for g in first) > 0
            for a, b in zip(first, second, strict=True):
                torch.testing.assert_close(a, b)
    finally:
        shutdown_distributed()
