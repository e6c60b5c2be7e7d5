"""The token dispatchers (dispatch -> grouped FFN -> combine) against a per-slot loop in fp32, on fresh random
routings across shapes and dtypes, with the Triton kernels (the interpreter on CPU) and without; the capacity
placement by hand; the expert order the all-to-all sends in; no host sync."""

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
    dispatch_in_order,
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


@pytest.mark.parametrize("dispatcher", [DroplessDispatcher(4), CapacityDispatcher(4, 2, 1.0)])
def test_dispatch_in_order_groups_rows_in_the_given_expert_order(dispatcher):
    """Rows grouped as if expert e were expert position[e] (the all-to-all's send order), the load per expert in
    the experts' own order, and the output unchanged."""
    experts = Experts(4, 8, 8, backend="grouped")
    x, slots = torch.randn(10, 8), random_slots(10, 4, 2, True, "cpu")
    position = torch.tensor([2, 0, 3, 1])
    plain, ordered = dispatcher.dispatch(x, slots), dispatch_in_order(dispatcher, x, slots, position)
    assert torch.equal(ordered.tokens_per_expert, plain.tokens_per_expert)
    assert torch.equal(ordered.rows.group_sizes, plain.rows.group_sizes[torch.argsort(position)])
    starts = torch.cumsum(plain.rows.group_sizes, 0) - plain.rows.group_sizes
    for e in range(4):  # expert e's rows, now at its new position's group
        new_start = int(ordered.rows.group_sizes[: position[e]].sum())
        size = int(plain.rows.group_sizes[e])
        want = plain.rows.x[starts[e] : starts[e] + size]
        assert torch.equal(ordered.rows.x[new_start : new_start + size], want)
    torch.testing.assert_close(run_ordered(dispatcher, experts, x, slots, position), run(dispatcher, experts, x, slots))


def run_ordered(dispatcher, experts: Experts, x: torch.Tensor, slots: Slots, position: torch.Tensor) -> torch.Tensor:
    """`run` with the experts' weights and rows in `position` order."""
    moved = Experts(4, 8, 8, backend="grouped")
    with torch.no_grad():
        moved.w_in[position] = experts.w_in
        moved.w_out[position] = experts.w_out
    dispatched = dispatch_in_order(dispatcher, x, slots, position)
    return dispatcher.combine(dispatcher.run_experts(moved, dispatched), dispatched)


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
