"""The token dispatchers (dispatch -> grouped FFN -> combine) against a per-slot loop in fp32, on fresh random
routings across shapes and dtypes, with the Triton kernels (the interpreter on CPU) and without; the capacity
placement and the all-to-all regrouping permutation by hand; no host sync."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moeformer.layers import triton_dispatch
from moeformer.layers.moe import (
    CapacityDispatcher,
    DroplessDispatcher,
    Experts,
    Slots,
    source_major_to_expert_major,
)
from moeformer.training.metrics import HostSyncs

DEVICES = [  # the references on CPU, the kernels on CPU (the interpreter) and on CUDA
    pytest.param("cpu", False, id="cpu"),
    pytest.param("cpu", True, id="cpu-kernels"),
    pytest.param(
        "cuda",
        True,
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


def slot_loop(x, slots: Slots, w_in, w_out, activation: str, capacity: int | None) -> torch.Tensor:
    """sum over each token's kept slots of weight * expert(x[token]), in fp32; with a capacity, each expert keeps
    its first `capacity` real slots in slot order."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    taken = [0] * w_in.shape[0]
    valid = [True] * slots.expert_idx.numel() if slots.valid is None else slots.valid.tolist()
    for s, (t, e) in enumerate(zip(slots.token_idx.tolist(), slots.expert_idx.tolist(), strict=True)):
        if not valid[s] or (capacity is not None and taken[e] >= capacity):
            continue
        taken[e] += 1
        h = x[t].float() @ w_in[e].float()
        h = F.silu(h[: w_out.shape[1]]) * h[w_out.shape[1] :] if activation == "swiglu" else F.gelu(h)
        out[t] = out[t] + slots.weights[s] * (h @ w_out[e].float())
    return out


def run(dispatcher, experts: Experts, x: torch.Tensor, slots: Slots) -> torch.Tensor:
    dispatched = dispatcher.dispatch(x, slots)
    return dispatcher.combine(dispatcher.run_experts(experts, dispatched), dispatched)


def random_slots(n: int, e: int, k: int, padding: bool, device) -> Slots:
    expert_idx = torch.rand(n, e).argsort(dim=-1)[:, :k].flatten().to(device)  # k distinct experts per token
    valid = (torch.rand(n * k) > 0.2).to(device) if padding else None
    return Slots(
        torch.arange(n, device=device).repeat_interleave(k), expert_idx, torch.rand(n * k, device=device), valid, k
    )


@pytest.mark.parametrize("device,kernels", DEVICES)
@pytest.mark.parametrize("dispatcher", ["dropless", "capacity"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize(
    "n,e,k,activation,padding",
    [
        (1, 4, 2, "swiglu", False),
        (13, 4, 2, "swiglu", True),
        (29, 8, 3, "gelu", True),
        (16, 3, 1, "swiglu", False),
        (300, 8, 2, "swiglu", True),
    ],
)
def test_dispatcher_matches_the_slot_loop(
    device, kernels, dispatcher, dtype, tol, n, e, k, activation, padding, monkeypatch
):
    """Output and the gradients of x, the routing weights and both expert weights: fp32 within 1e-5 of the largest
    value (summation order only); bf16 within 3e-2 (inputs, weights and the GEMM/activation outputs rounded to
    bf16's 8 bits, about 4e-3 each, over two GEMMs and the activation)."""
    if kernels and device == "cpu":
        if not triton_dispatch.INTERPRETER:
            pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1)")
        if n > 29:
            pytest.skip("the interpreter is slow: small shapes only")
    monkeypatch.setattr(triton_dispatch, "interpret_on_cpu", kernels)
    torch.manual_seed(n * e * k)
    experts = Experts(e, 16, 16, activation, backend="grouped" if device == "cpu" else "auto").to(device, dtype)
    x = torch.randn(n, 16, device=device, dtype=dtype)
    slots = random_slots(n, e, k, padding, device)
    capacity = None
    if dispatcher == "dropless":
        disp = DroplessDispatcher(e)
    else:
        disp = CapacityDispatcher(e, k, 0.7)  # drops slots of the busier experts
        capacity = disp.capacity(n)
    results = []
    for fast in (True, False):
        xi, wi = x.clone().requires_grad_(), slots.weights.clone().requires_grad_()
        params = [experts.w_in, experts.w_out]
        if fast:
            out = run(disp, experts, xi, Slots(slots.token_idx, slots.expert_idx, wi, slots.valid, k))
        else:
            out = slot_loop(
                xi, Slots(slots.token_idx, slots.expert_idx, wi, slots.valid, k), *params, activation, capacity
            )
        grads = torch.autograd.grad(out.float().square().sum(), [xi, wi, *params])
        results.append((out.float(), [g.float() for g in grads]))
    (out, grads), (ref, ref_grads) = results
    assert (out - ref).abs().max().item() <= tol * ref.abs().max().item()
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max().item() <= tol * r.abs().max().item() + 1e-12


def test_capacity_placement_by_hand():
    slots = Slots(
        torch.tensor([0, 0, 1, 1, 2, 2]),
        torch.tensor([1, 0, 1, 1, 2, 0]),
        torch.ones(6),
        torch.tensor([True, True, True, True, True, False]),
        2,
    )  # slot 5 is padding
    disp = CapacityDispatcher(num_experts=3, top_k=2, capacity_factor=1.0)
    assert disp.capacity(3) == 2  # ceil(1.0 * 3 tokens * 2 / 3 experts)
    rows, kept, tokens_per_expert, dropped = disp.place(slots, 3)
    # expert e owns rows [2e, 2e + 2); expert 1 takes slots 0 and 2, its third slot (3) is dropped; 6 = no row
    assert rows.tolist() == [2, 0, 3, 6, 4, 6]
    assert kept.tolist() == [True, True, True, False, True, False]
    assert tokens_per_expert.tolist() == [1, 3, 1] and dropped.item() == 1


def test_regrouping_received_rows_by_local_expert_by_hand():
    # rank 0 sent 1 row for local expert 0 and 2 for expert 1; rank 1 sent 3 for expert 0 and none for expert 1
    dest, src = source_major_to_expert_major(torch.tensor([[1, 2], [3, 0]]), 6)
    assert src.tolist() == [0, 3, 4, 5, 1, 2]  # expert 0: rank 0's row, rank 1's three; then expert 1
    assert dest.tolist() == [0, 4, 5, 1, 2, 3]


@pytest.mark.parametrize("ranks,local", [(2, 4), (4, 3), (8, 8)])
def test_regrouping_equals_the_stable_sort_it_replaces(ranks, local):
    counts = torch.randint(0, 5, (ranks, local))
    counts[0] = 0  # a rank that sends nothing
    total = int(counts.sum())
    expert_of_row = torch.arange(local).repeat(ranks).repeat_interleave(counts.flatten())
    dest, src = source_major_to_expert_major(counts, total)
    assert torch.equal(src, torch.argsort(expert_of_row, stable=True))
    assert torch.equal(dest[src], torch.arange(total))


@pytest.mark.parametrize("dispatcher", [DroplessDispatcher(4), CapacityDispatcher(4, 2, 1.0)])
def test_dispatch_and_combine_never_wait_for_the_device(dispatcher):
    experts = Experts(4, 8, 8, backend="grouped")
    x = torch.randn(10, 8, requires_grad=True)
    slots = random_slots(10, 4, 2, True, "cpu")
    with HostSyncs(cuda=False) as syncs:
        run(dispatcher, experts, x, slots).sum().backward()
    assert syncs.count == 0
    with HostSyncs(cuda=False) as syncs:  # the counter sees what it should
        x.sum().item()
        slots.expert_idx.tolist()
        slots.expert_idx.nonzero()
    assert syncs.count == 3


def test_capacity_layout_is_static():
    disp = CapacityDispatcher(8, 2, 1.25)
    for n in (5, 40):
        slots = random_slots(n, 8, 2, False, "cpu")
        rows = disp.dispatch(torch.randn(n, 4), slots).rows
        c = math.ceil(1.25 * n * 2 / 8)
        assert rows.capacity == c and rows.x.shape == (8 * c, 4) and rows.group_sizes.tolist() == [c] * 8
