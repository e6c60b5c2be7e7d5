"""The parity checks of tests/test_parallel.py on GPUs with NCCL (one GPU per rank): ep=2, tp=2, pp=2 on 2 GPUs and
ep=2 x dp=2, tp=2 x dp=2, pp=2 x dp=2 on 4 GPUs. Skipped without enough CUDA devices."""

from __future__ import annotations

import pytest
import torch

from tests.test_parallel import assert_layout, assert_pipeline, launch

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]


def needs_gpus(n: int):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPUs for NCCL parity checks")


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory):
    return launch("two_ranks", 2, tmp_path_factory.mktemp("parallel_gpu") / "two.json", gpus=True)


@pytest.fixture(scope="module")
def four_gpus(tmp_path_factory):
    return launch("four_ranks", 4, tmp_path_factory.mktemp("parallel_gpu") / "four.json", gpus=True)


@needs_gpus(2)
@pytest.mark.parametrize("key", ["ep2", "tp2", "tp2_mqa_tied", "tp2_expert_tp"])
def test_layouts_match_single_gpu(two_gpus, key):
    assert_layout(two_gpus[key], stages=(0, 2) if key == "ep2" else (0,))


@needs_gpus(2)
@pytest.mark.parametrize("key", ["pp2", "pp2_tied"])
def test_pipeline_matches_single_gpu(two_gpus, key):
    assert_pipeline(two_gpus[key])


@needs_gpus(2)
def test_expert_parallel_layer_on_gpus(two_gpus):
    for case, err in two_gpus["expert_layer"].items():
        tol = 2e-2 if "bf16" in case else 1e-5
        assert err["out"] <= tol and err["x_grad"] <= tol and err["expert_grad"] <= tol, (case, err)


@needs_gpus(4)
@pytest.mark.parametrize("key", ["ep2_dp2", "tp2_dp2", "ep2_tp2"])
def test_layouts_times_data_parallel_on_four_gpus(four_gpus, key):
    assert_layout(four_gpus[key])


@needs_gpus(4)
@pytest.mark.parametrize("key", ["pp2_dp2", "pp2_tp2_tied"])
def test_pipeline_times_data_or_tensor_parallel_on_four_gpus(four_gpus, key):
    assert_pipeline(four_gpus[key])
