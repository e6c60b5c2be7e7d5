"""Expert pruning and merging of a trained MoE model: measure how each routed expert is used on calibration batches,
keep the experts a criterion ranks first in every MoE layer, and drop the others or fold them into the kept expert
whose router row is closest. Shared experts are never touched. The result is a new `CausalLM` whose config records
the smaller expert count, so it saves, exports and loads like any other model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moeformer.layers.moe import MoE, Router
from moeformer.models.model import CausalLM

CRITERIA = ("load", "router_mass")


@dataclass
class ExpertUsage:
    """How one MoE layer routed the real (non-padding) tokens of the calibration batches."""

    counts: Tensor  # (E,) int64: token slots routed to each expert (before any capacity drop)
    mass: Tensor  # (E,) float64: summed combine weights of those slots

    def ranking(self, criterion: str = "load") -> list[int]:
        """Experts from most to least used: by count ("load") or routed weight ("router_mass"), ties broken by the
        other measure and then by the lower index, so the order is deterministic."""
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        first, second = (self.counts, self.mass) if criterion == "load" else (self.mass, self.counts)
        return sorted(range(len(self.counts)), key=lambda e: (-float(first[e]), -float(second[e]), e))


def moe_layers(model: CausalLM) -> dict[int, MoE]:
    """{block index: its MoE module} for every MoE block of `model`."""
    return {i: block.mlp for i, block in enumerate(model.layers) if isinstance(block.mlp, MoE)}


@torch.no_grad()
def expert_usage(model: CausalLM, batches: Iterable[dict[str, Tensor] | Tensor]) -> dict[int, ExpertUsage]:
    """Per MoE layer (by block index), exact counts and routed weight of each expert over `batches`: dicts as
    `TokenDataset.get_batch` makes them (input_ids, and position_ids / document_ids for packed documents) or plain
    input_ids tensors. Counted from each router's output, so every routing rule (top-k, group-limited, expert
    choice) is measured as it routes; padding tokens (a False in the routers' token mask) are left out."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers: there are no experts to measure")
    device = next(model.parameters()).device
    usage = {
        i: ExpertUsage(
            torch.zeros(m.config.num_experts, dtype=torch.long), torch.zeros(m.config.num_experts, dtype=torch.float64)
        )
        for i, m in layers.items()
    }

    def hook(index: int):
        def record(router: Router, args: tuple, kwargs: dict, routing) -> None:
            mask = args[1] if len(args) > 1 else kwargs.get("token_mask")
            expert, weight = routing.expert_idx, routing.weights.double()
            if mask is not None:
                valid = mask[routing.token_idx]
                expert, weight = expert[valid], weight[valid]
            e = router.weight.shape[0]
            usage[index].counts += torch.bincount(expert, minlength=e).cpu()
            usage[index].mass += (
                torch.zeros(e, dtype=torch.float64, device=weight.device).index_add_(0, expert, weight).cpu()
            )

        return record

    handles = [m.router.register_forward_hook(hook(i), with_kwargs=True) for i, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if isinstance(batch, Tensor):
                batch = {"input_ids": batch}
            model(
                batch["input_ids"].to(device),
                position_ids=_to(batch.get("position_ids"), device),
                document_ids=_to(batch.get("document_ids"), device),
                return_logits=False,
            )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return usage


def _to(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device)


def select_experts(
    usage: Mapping[int, ExpertUsage],
    keep: int | None = None,
    keep_total: int | None = None,
    criterion: str = "load",
    min_per_layer: int = 1,
) -> dict[int, list[int]]:
    """{layer: sorted indices of the experts to keep}: the `keep` best of every layer, or with `keep_total` the
    best `keep_total` over all layers (each layer first keeps its `min_per_layer` best), each expert scored by its
    share of its own layer's usage, so layers with more traffic do not take every slot."""
    if (keep is None) == (keep_total is None):
        raise ValueError("give exactly one of keep (experts per layer) and keep_total (experts over all layers)")
    ranked = {i: u.ranking(criterion) for i, u in usage.items()}
    if keep is not None:
        return {i: sorted(order[:keep]) for i, order in ranked.items()}
    kept = {i: order[:min_per_layer] for i, order in ranked.items()}
    if not sum(map(len, kept.values())) <= keep_total <= sum(map(len, ranked.values())):
        raise ValueError(
            f"keep_total={keep_total} cannot hold {min_per_layer} experts in each of {len(usage)} "
            "layers or exceeds the experts there are"
        )
    measure = {i: (u.counts.double() if criterion == "load" else u.mass) for i, u in usage.items()}
    rest = sorted(
        (-(measure[i][e] / measure[i].sum().clamp_min(1e-30)).item(), i, e)
        for i, order in ranked.items()
        for e in order[min_per_layer:]
    )
    for _, i, e in rest[: keep_total - sum(map(len, kept.values()))]:
        kept[i].append(e)
    return {i: sorted(experts) for i, experts in kept.items()}


def check_prunable(model: CausalLM, keep: int | None = None, keep_total: int | None = None) -> dict[int, MoE]:
    """The MoE layers of `model` ({block index: MoE}) after checking that they can be pruned to `keep` experts per
    layer or `keep_total` over all layers; a ValueError names what cannot be done."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers: there are no experts to prune")
    if model.config.quantization:
        raise ValueError(
            f"the model is quantized ({model.config.quantization}); prune or merge experts of the "
            "full-precision model, then quantize"
        )
    moe = model.config.moe
    if moe.num_groups > 1:
        raise ValueError(
            f"group-limited routing (moe.num_groups={moe.num_groups}) fixes the experts of each group; "
            "pruning it is not supported"
        )
    _check_count(keep, moe.num_experts, moe.top_k, "keep")
    if keep_total is not None and not len(layers) * moe.top_k <= keep_total <= len(layers) * moe.num_experts:
        raise ValueError(
            f"keep_total={keep_total} must be in [{len(layers) * moe.top_k}, "
            f"{len(layers) * moe.num_experts}]: {len(layers)} MoE layers of {moe.num_experts} experts, "
            f"each keeping at least top_k={moe.top_k}"
        )
    return layers


def plan_pruning(
    model: CausalLM,
    keep: int | Mapping[int, list[int]] | None = None,
    keep_total: int | None = None,
    criterion: str = "load",
    usage: Mapping[int, ExpertUsage] | None = None,
) -> dict[int, list[int]]:
    """{MoE layer: sorted indices of the experts to keep}, checked against the model (see `prune_experts` for the
    arguments): a ValueError names a count out of range, below top_k, or a model that cannot be pruned."""
    layers = check_prunable(model, keep if isinstance(keep, int) else None, keep_total)
    moe = model.config.moe
    if usage is not None and set(usage) != set(layers):
        raise ValueError(f"usage covers layers {sorted(usage)}, the model's MoE layers are {sorted(layers)}")
    if isinstance(keep, int) or keep_total is not None:
        if usage is None:
            raise ValueError("choosing experts needs their usage: pass usage=expert_usage(model, calibration batches)")
        plan = select_experts(usage, keep if isinstance(keep, int) else None, keep_total, criterion, moe.top_k)
    elif isinstance(keep, Mapping):
        unknown = sorted(set(keep) - set(layers))
        if unknown:
            raise ValueError(f"layers {unknown} are not MoE layers (those are {sorted(layers)})")
        plan = {i: sorted(keep.get(i, range(moe.num_experts))) for i in layers}
    else:
        raise ValueError(f"keep must be an int or {{layer: [experts]}}, got {keep!r}")
    for i, kept in plan.items():
        if len(set(kept)) != len(kept) or not all(0 <= e < moe.num_experts for e in kept):
            raise ValueError(f"layer {i}: experts to keep {kept} must be distinct indices in [0, {moe.num_experts})")
        _check_count(len(kept), moe.num_experts, moe.top_k, f"the expert count of layer {i}")
    return plan


def prune_experts(
    model: CausalLM,
    keep: int | Mapping[int, list[int]] | None = None,
    *,
    keep_total: int | None = None,
    criterion: str = "load",
    usage: Mapping[int, ExpertUsage] | None = None,
    merge: bool = False,
) -> CausalLM:
    """A copy of `model` with fewer routed experts per MoE layer.

    keep: experts to keep in every layer (ranked by `criterion` on `usage`, see `expert_usage`), or {layer: expert
    indices} chosen by the caller (layers left out keep all); keep_total: a budget over all MoE layers instead.
    Router rows (and aux-loss-free router biases) and expert weights are sliced; shared experts stay. With `merge`
    each removed expert is folded into a kept one (`merge_experts`). The new config records the expert count, so
    `top_k` must not exceed it; quantized models are refused (prune the full-precision model, then quantize).
    A token whose top-k experts are all kept is routed as before when its combine weights ignore the other experts
    (softmax with norm_topk_prob, sigmoid scores); a softmax router without norm_topk_prob gives every token larger
    weights (its probabilities are over the kept experts only)."""
    plan = plan_pruning(model, keep, keep_total, criterion, usage)
    if merge and usage is None:
        raise ValueError("merging weights experts by their routed mass: pass usage=expert_usage(...)")
    return _rebuild(model, plan, usage if merge else None)


def merge_experts(model: CausalLM, keep: int | Mapping[int, list[int]] | None = None, **kwargs) -> CausalLM:
    """`prune_experts` that folds each removed expert into the kept expert whose router row is closest (cosine
    similarity): the kept expert's weights become the average of its own and its folded experts' weights, each
    weighted by its routed mass on the calibration batches; the kept router row stays as it is."""
    return prune_experts(model, keep, merge=True, **kwargs)


def _check_count(keep: int | None, num_experts: int, top_k: int, what: str) -> None:
    if keep is None:
        return
    if not 1 <= keep <= num_experts:
        raise ValueError(
            f"{what}={keep} must be in [1, {num_experts}] (the model has {num_experts} routed experts per MoE layer)"
        )
    if keep < top_k:
        raise ValueError(
            f"{what}={keep} is below moe.top_k={top_k}: every token needs top_k experts; keep at least "
            f"{top_k} (or lower top_k)"
        )


def fold_targets(router_weight: Tensor, kept: list[int]) -> dict[int, int]:
    """{removed expert: the kept expert whose router row is closest in cosine similarity}."""
    rows = F.normalize(router_weight.detach().float(), dim=-1)
    removed = [e for e in range(rows.shape[0]) if e not in kept]
    if not removed:
        return {}
    nearest = (rows[removed] @ rows[kept].t()).argmax(dim=-1)
    return {e: kept[j] for e, j in zip(removed, nearest.tolist(), strict=True)}


def merged_weight(weight: Tensor, mass: Tensor, kept: list[int], folds: dict[int, int]) -> Tensor:
    """weight (E, ...) reduced to the kept experts; each kept expert averages itself and the experts folded into it,
    weighted by `mass` (E,); a group without routed mass keeps the kept expert's own weights."""
    out = []
    for k in kept:
        group = [k] + [e for e, target in folds.items() if target == k]
        w = mass[group].to(device=weight.device, dtype=torch.float64)
        if w.sum() <= 0:
            out.append(weight[k])
            continue
        avg = torch.einsum("g,g...->...", w / w.sum(), weight[group].to(torch.float64))
        out.append(avg.to(weight.dtype))
    return torch.stack(out)


@torch.no_grad()
def _rebuild(model: CausalLM, plan: dict[int, list[int]], usage: Mapping[int, ExpertUsage] | None) -> CausalLM:
    """A new model with each MoE layer reduced to `plan[layer]`'s experts (folded by `usage` mass when given)."""
    counts = {len(kept) for kept in plan.values()}
    if len(counts) > 1:
        per_layer = {i: len(kept) for i, kept in plan.items()}
        raise ValueError(
            f"the layers would keep different numbers of experts {per_layer}, but a model config holds "
            "one expert count for all MoE layers; keep the same number in every layer"
        )
    config = model.config.replace(moe={"num_experts": counts.pop()})
    state = model.state_dict()
    for i, kept in plan.items():
        prefix = f"layers.{i}.mlp."
        index = torch.tensor(kept, device=state[prefix + "router.weight"].device)
        folds = fold_targets(state[prefix + "router.weight"], kept) if usage is not None else {}
        for name in ("experts.w_in", "experts.w_out"):
            weight = state[prefix + name]
            state[prefix + name] = merged_weight(weight, usage[i].mass, kept, folds) if folds else weight[index]
        for name in ("router.weight", "router.expert_bias"):
            if prefix + name in state:
                state[prefix + name] = state[prefix + name][index]
    device = next(model.parameters()).device
    with torch.device(device):
        pruned = CausalLM(config)
    pruned.to(model.tok_embeddings.weight.dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.reset_buffers()
    return pruned.train(model.training)
