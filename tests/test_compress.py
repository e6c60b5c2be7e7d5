"""Expert pruning and merging: usage counts against the layers' own statistics, the identity at K = E, the experts a
hand-built router makes each criterion rank first, merged weights as mass-weighted averages, pruned Hugging Face
exports in transformers, the prune script end to end and its one-line errors, and `model.init_from`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moeformer.errors import CheckpointError
from moeformer.models.checkpoint import save_pretrained
from moeformer.models.compress import (
    ExpertUsage,
    expert_usage,
    fold_targets,
    merge_experts,
    plan_pruning,
    prune_experts,
)
from moeformer.models.model import CausalLM, from_pretrained
from moeformer.models.quantize import quantize
from moeformer.training.data import TokenDataset, prepare_corpus
from moeformer.training.init_from import load_weights
from tests.test_hf_checkpoint import tiny_model as tiny
from tests.test_scripts import script
from tests.workers import REPO, run_train


def ids(vocab: int = 64, batch: int = 3, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: CausalLM, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits


VARIANTS = {
    "softmax": {},
    "sigmoid-bias-shared-tied": dict(
        tie_embeddings=True,
        moe={
            "num_experts": 4,
            "top_k": 2,
            "ffn_dim": 16,
            "router": "sigmoid",
            "router_bias": True,
            "num_shared_experts": 1,
        },
    ),
    "expert-choice": dict(
        moe={
            "num_experts": 4,
            "top_k": 2,
            "ffn_dim": 16,
            "router": "expert_choice",
            "dispatcher": "capacity",
            "capacity_factor": 1.0,
        }
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_usage_counts_equal_the_layers_own_load_statistics(variant):
    model = tiny(**VARIANTS[variant])
    batches = [ids(seed=s) for s in range(3)]
    usage = expert_usage(model, batches)
    expected = {i: torch.zeros(4, dtype=torch.long) for i in usage}
    with torch.no_grad():
        for x in batches:
            for i, stats in zip(usage, model(x).moe_stats, strict=True):
                expected[i] += stats.tokens_per_expert
    for i, u in usage.items():
        assert torch.equal(u.counts, expected[i])
        assert u.counts.sum() == 3 * 3 * 16 * 2  # every token takes top_k slots (expert choice: capacity slots)
        assert u.mass.min() >= 0 and u.mass.sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_keeping_every_expert_is_the_identity(variant):
    model = tiny(**VARIANTS[variant])
    usage = expert_usage(model, [ids()])
    pruned = prune_experts(model, 4, usage=usage)
    assert pruned is not model and pruned.config.moe.num_experts == 4
    assert torch.equal(logits(pruned, ids(seed=5)), logits(model, ids(seed=5)))
    assert torch.equal(logits(merge_experts(model, 4, usage=usage), ids(seed=5)), logits(model, ids(seed=5)))


def test_pruning_experts_that_are_never_chosen_keeps_the_logits():
    """Selection bias -100 keeps experts 1 and 3 out of every top-2 (sigmoid scores lie in (0, 1)): dropping them
    must leave the model's function intact, which it does only if router rows, biases and expert weights are sliced
    consistently."""
    model = tiny(moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16, "router": "sigmoid", "router_bias": True})
    for block in model.layers:
        block.mlp.router.expert_bias.copy_(torch.tensor([0.0, -100.0, 0.0, -100.0]))
    usage = expert_usage(model, [ids()])
    assert all(u.counts[[1, 3]].sum() == 0 for u in usage.values())
    pruned = prune_experts(model, 2, usage=usage)
    assert pruned.config.moe.num_experts == 2
    assert torch.equal(pruned.layers[0].mlp.router.expert_bias, torch.zeros(2))
    assert torch.equal(pruned.layers[1].mlp.experts.w_in, model.layers[1].mlp.experts.w_in[[0, 2]])
    torch.testing.assert_close(logits(pruned, ids(seed=7)), logits(model, ids(seed=7)), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "moe",
    [
        {"router": "softmax", "norm_topk_prob": True},
        {"router": "sigmoid", "router_bias": True, "num_shared_experts": 1},
        {"router": "sigmoid", "norm_topk_prob": False},
    ],
    ids=["softmax-renormalised", "sigmoid-bias-shared", "sigmoid-raw"],
)
def test_tokens_whose_experts_are_all_kept_get_the_same_moe_output(moe):
    """Routers whose combine weights do not depend on the other experts' scores (softmax renormalised over the
    top-k: p_i / (p_i + p_j) is exp(l_i) / (exp(l_i) + exp(l_j)) whatever the other experts; sigmoid scores) route
    a token whose top-k experts are all kept to the same experts with the same weights after pruning: its MoE
    output is unchanged, up to fp32 rounding of the softmax. The other tokens take a kept expert instead (changed).
    (A softmax router without norm_topk_prob changes every token: its weights are probabilities over all experts.)"""
    model = tiny(moe={"num_experts": 8, "top_k": 2, "ffn_dim": 16, **moe})
    if moe.get("router_bias"):
        for block in model.layers:
            block.mlp.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    kept = [0, 2, 3, 5, 6, 7]
    pruned = prune_experts(model, {i: kept for i in range(len(model.layers))})
    before, after = model.layers[1].mlp, pruned.layers[1].mlp
    h = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        chosen = before.router(h.view(-1, 32)).expert_idx.view(-1, 2)
        whole = torch.isin(chosen, torch.tensor(kept)).all(dim=-1)
        out, out_pruned = before(h)[0].view(-1, 32), after(h)[0].view(-1, 32)
    assert whole.sum() >= 16 and (~whole).sum() >= 16  # both kinds of token are there
    torch.testing.assert_close(out_pruned[whole], out[whole], rtol=1e-5, atol=1e-6)
    assert ((out_pruned[~whole] - out[~whole]).abs().amax(dim=-1) > 1e-4).all()


def hand_routed_model() -> tuple[CausalLM, list[float]]:
    """One MoE layer (top-1, weights = softmax probabilities) whose input is the normed embedding: token t's
    embedding is a positive multiple of basis vector t % 4 (attention output is zeroed) and router row e is a_e times
    basis vector e, so token t always routes to expert t % 4 with probability p_e = softmax over (a_e * sqrt(dim), 0,
    0, 0) that the test computes by hand."""
    model = tiny(n_layers=1, vocab_size=8, moe={"num_experts": 4, "top_k": 1, "ffn_dim": 16, "norm_topk_prob": False})
    a, dim = [0.05, 1.0, 1.0, 1.0], 32
    with torch.no_grad():
        model.layers[0].attn.o_proj.weight.zero_()
        model.layers[0].mlp_norm.weight.fill_(1.0)
        model.tok_embeddings.weight.zero_()
        for t in range(8):
            model.tok_embeddings.weight[t, t % 4] = 1.0 + t
        router = model.layers[0].mlp.router.weight
        router.zero_()
        for e in range(4):
            router[e, e] = a[e]
    probs = [math.exp(a_e * dim**0.5) / (math.exp(a_e * dim**0.5) + 3) for a_e in a]
    return model, probs


def test_each_criterion_keeps_exactly_the_experts_it_ranks_first():
    model, probs = hand_routed_model()
    # tokens of expert 0: 10, expert 1: 6, expert 2: 4, expert 3: 1 (ids t and t + 4 share an expert)
    x = torch.tensor([[0] * 5 + [4] * 5 + [1] * 3 + [5] * 3 + [2, 6, 2, 6] + [3]])
    usage = expert_usage(model, [x])[0]
    assert usage.counts.tolist() == [10, 6, 4, 1]
    assert usage.mass.tolist() == pytest.approx([n * p for n, p in zip([10, 6, 4, 1], probs, strict=True)], rel=1e-5)
    # load ranks 0, 1, 2, 3; routed mass (expert 0 has a flat router row: low probability) ranks 1, 2, 0, 3
    assert usage.ranking("load") == [0, 1, 2, 3] and usage.ranking("router_mass") == [1, 2, 0, 3]
    for criterion, kept in (("load", [0, 1]), ("router_mass", [1, 2])):
        pruned = prune_experts(model, 2, criterion=criterion, usage={0: usage})
        moe, original = pruned.layers[0].mlp, model.layers[0].mlp
        assert torch.equal(moe.router.weight, original.router.weight[kept])
        assert torch.equal(moe.experts.w_in, original.experts.w_in[kept])
        assert torch.equal(moe.experts.w_out, original.experts.w_out[kept])


def test_merged_experts_are_the_mass_weighted_average_of_their_group():
    model = tiny()
    with torch.no_grad():  # router rows: expert 2 is nearest to 0 and expert 3 nearest to 1 (cosine)
        basis = torch.eye(32)
        for block in model.layers:
            block.mlp.router.weight.copy_(
                torch.stack([basis[0], basis[1], basis[0] * 3 + basis[1], basis[1] - 0.5 * basis[0]])
            )
    assert fold_targets(model.layers[0].mlp.router.weight, [0, 1]) == {2: 0, 3: 1}
    mass = torch.tensor([2.0, 1.0, 6.0, 3.0], dtype=torch.float64)
    usage = {i: ExpertUsage(torch.tensor([5, 5, 5, 5]), mass) for i in (0, 1)}
    merged = merge_experts(model, {0: [0, 1], 1: [0, 1]}, usage=usage)
    for block, original in zip(merged.layers, model.layers, strict=True):
        for name in ("w_in", "w_out"):
            w = getattr(original.mlp.experts, name)
            expected = torch.stack([(2 * w[0] + 6 * w[2]) / 8, (1 * w[1] + 3 * w[3]) / 4])
            torch.testing.assert_close(getattr(block.mlp.experts, name), expected, rtol=0, atol=1e-7)
        assert torch.equal(block.mlp.router.weight, original.mlp.router.weight[:2])
    assert merged.config.moe.num_experts == 2


def test_refusals_name_the_problem():
    model = tiny()
    usage = expert_usage(model, [ids()])
    for keep, message in (
        (0, r"keep=0 must be in \[1, 4\]"),
        (5, r"keep=5 must be in \[1, 4\]"),
        (1, r"keep=1 is below moe.top_k=2"),
    ):
        with pytest.raises(ValueError, match=message):
            prune_experts(model, keep, usage=usage)
    with pytest.raises(ValueError, match="needs their usage"):
        prune_experts(model, 3)
    with pytest.raises(ValueError, match="distinct indices"):
        prune_experts(model, {0: [0, 0, 1]})
    with pytest.raises(ValueError, match="keep_total=3 must be in"):
        prune_experts(model, keep_total=3, usage=usage)
    uneven = {
        0: ExpertUsage(torch.tensor([9, 9, 9, 0]), torch.ones(4, dtype=torch.float64)),
        1: ExpertUsage(torch.tensor([9, 9, 0, 0]), torch.ones(4, dtype=torch.float64)),
    }
    assert plan_pruning(model, keep_total=5, usage=uneven) == {0: [0, 1, 2], 1: [0, 1]}
    with pytest.raises(ValueError, match="different numbers of experts"):
        prune_experts(model, keep_total=5, usage=uneven)
    with pytest.raises(ValueError, match="group-limited"):
        prune_experts(tiny(moe={"num_experts": 4, "top_k": 2, "ffn_dim": 16, "num_groups": 2}), 3, usage=usage)
    with pytest.raises(ValueError, match="is quantized .* prune or merge experts of the full-precision model"):
        prune_experts(quantize(tiny(), "int8"), 3, usage=usage)
    with pytest.raises(ValueError, match="no MoE layers"):
        prune_experts(tiny(moe=None), 3)


transformers = pytest.importorskip("transformers")
FAMILIES = {
    "mixtral": {},
    "olmoe": dict(qk_norm="full"),
    "qwen2_moe": dict(
        attn_bias=True,
        moe={
            "num_experts": 4,
            "top_k": 2,
            "ffn_dim": 16,
            "num_shared_experts": 1,
            "shared_ffn_dim": 24,
            "shared_expert_gate": True,
        },
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("merge", [False, True], ids=["pruned", "merged"])
def test_pruned_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, family, merge):
    model = tiny(**FAMILIES[family])
    pruned = prune_experts(model, 3, usage=expert_usage(model, [ids()]), merge=merge)
    save_pretrained(pruned, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == family
    assert written["num_local_experts" if family == "mixtral" else "num_experts"] == 3
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = ids(seed=3)
    with torch.no_grad():
        assert (hf(x).logits - logits(pruned, x)).abs().max() <= 1e-4
    assert torch.equal(logits(from_pretrained(tmp_path / "hf"), x), logits(pruned, x))


# ---- the script -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A byte corpus and a small tiny-moe export beside it with the corpus's meta.json, as a training run writes
    it."""
    root = tmp_path_factory.mktemp("prune")
    prepare_corpus(root / "data", max_files=4, val_fraction=0.5)
    model = tiny(name="tiny-moe", vocab_size=258, moe={"num_experts": 8, "top_k": 2, "ffn_dim": 16})
    save_pretrained(model, root / "model", format="native")
    (root / "model" / "meta.json").write_bytes((root / "data" / "meta.json").read_bytes())
    return root


@pytest.mark.parametrize("options", [["--format", "hf", "--merge"], ["--criterion", "router_mass"]])
def test_prune_script_writes_a_loadable_checkpoint_with_its_tokenizer(source, tmp_path, options, capsys):
    record = script("prune_experts").main(
        [
            str(source / "model"),
            str(tmp_path / "out"),
            "--keep",
            "6",
            "--calibration",
            str(source / "data"),
            "--batches",
            "2",
            "--batch",
            "2",
            "--seq-len",
            "32",
            *options,
        ]
    )
    assert "8 -> 6 experts" in capsys.readouterr().out
    loaded = from_pretrained(tmp_path / "out")
    assert loaded.config.moe.num_experts == 6 and record["num_experts"] == 6
    assert (tmp_path / "out" / "meta.json").read_bytes() == (source / "data" / "meta.json").read_bytes()
    plan = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert all(len(kept) == 6 for kept in plan["kept"].values())
    assert all(sum(u["counts"]) == 4 * 32 * 2 for u in plan["usage"].values())  # 4 windows x 32 tokens x top-2
    original = from_pretrained(source / "model")
    if "--merge" not in options:  # the kept experts, unchanged
        kept = plan["kept"]["0"]
        assert torch.equal(loaded.layers[0].mlp.experts.w_out, original.layers[0].mlp.experts.w_out[kept])
    calibration = TokenDataset.from_dir(source / "data", "val", 32).get_batch([0])["input_ids"]
    assert logits(loaded, calibration).shape == logits(original, calibration).shape


@pytest.mark.parametrize(
    "args, message",
    [
        (["--keep", "0"], "keep=0 must be in [1, 8]"),
        (["--keep", "9"], "keep=9 must be in [1, 8]"),
        (["--keep", "1"], "keep=1 is below moe.top_k=2"),
        (["--keep", "4", "--calibration", "{root}/nowhere"], "{root}/nowhere/meta.json does not exist"),
        (["--keep", "4", "--calibration", None], "--calibration DATA_DIR is required"),
        (["--keep", "4", "--src", "{root}/missing"], "checkpoint directory {root}/missing does not exist"),
    ],
)
def test_prune_script_errors_are_one_line(source, tmp_path, capsys, args, message):
    options = {"--src": str(source / "model"), "--calibration": str(source / "data")}
    options.update((k, v if v is None else v.format(root=source)) for k, v in zip(args[::2], args[1::2]))
    argv = [options.pop("--src"), str(tmp_path / "out")]
    argv += [item for k, v in options.items() if v is not None for item in (k, v)]
    with pytest.raises(SystemExit) as exited:
        script("prune_experts").main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message.format(root=source) in err, err
    assert not (tmp_path / "out").exists()


def test_prune_script_copies_side_files_but_no_link_leading_out(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_text("weights")
    (tmp_path / "secret").write_text("elsewhere")
    (src / "inside.json").symlink_to(src / "tokenizer.json")
    (src / "outside.json").symlink_to(tmp_path / "secret")
    assert script("prune_experts").copy_side_files(src, dst) == ["inside.json", "tokenizer.json"]
    assert sorted(p.name for p in dst.iterdir()) == ["inside.json", "tokenizer.json"]


def test_init_from_loads_matching_weights_and_names_mismatched_shapes(source, tmp_path):
    model = from_pretrained(source / "model")
    target = tiny(vocab_size=258, moe={"num_experts": 8, "top_k": 2, "ffn_dim": 16})
    torch.manual_seed(3)
    target.init_weights()
    load_weights(target, source / "model")
    assert all(
        torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values(), strict=True)
    )
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.router.weight: checkpoint \(8, 32\) vs model \(6, 32\)"):
        load_weights(tiny(vocab_size=258, moe={"num_experts": 6, "top_k": 2, "ffn_dim": 16}), source / "model")


def prune_to_six(source: Path, dst: Path) -> None:
    """scripts/prune_experts.py: the trained tiny model of `source` to 6 experts, calibrated on one small batch."""
    script("prune_experts").main(
        [
            str(source / "model"),
            str(dst),
            "--keep",
            "6",
            "--calibration",
            str(source / "data"),
            "--batches",
            "1",
            "--batch",
            "2",
            "--seq-len",
            "32",
        ]
    )


def test_a_run_initialised_from_a_pruned_checkpoint_starts_from_its_weights(source, tmp_path):
    """scripts/train.py with model.init_from: one step at lr 1e-9 (AdamW moves each weight by about the lr) exports
    the pruned checkpoint's weights."""
    prune_to_six(source, tmp_path / "pruned")
    pruned = from_pretrained(tmp_path / "pruned")
    model = {k: v for k, v in pruned.config.to_dict().items() if k not in ("name", "extra")}
    overrides = [
        f"--out_dir={tmp_path / 'run'}",
        f"--data.dir={source / 'data'}",
        "--data.seq_len=32",
        "--data.micro_batch_size=2",
        "--train.steps=1",
        "--train.dtype=fp32",
        "--train.zero_stage=0",
        "--train.eval_batches=1",
        "--train.progress_bar=false",
        "--optim.lr=1e-9",
        "--optim.warmup_steps=0",
        "--model.name=tiny-moe",
        f"--model.init_from={tmp_path / 'pruned'}",
        *(f"--model.{k}={json.dumps(v)}" for k, v in model.items()),
    ]
    proc = run_train(overrides)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    trained = from_pretrained(tmp_path / "run" / "model").state_dict()
    for name, value in pruned.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6)


def test_compression_table_heals_from_the_pruned_config_and_checks_the_goals(source, tmp_path):
    """The driver's pieces that need no process: the healing run's config and the table with its goal lines (the
    whole driver runs end to end on CPU in about 5 minutes; see scripts/compression_table.py)."""
    from moeformer.training.config import load_config

    table_script = script("compression_table")
    args = table_script.parse_args(
        [
            "--teacher",
            str(source / "model"),
            "--data",
            str(source / "data"),
            "--out",
            str(tmp_path / "out"),
            "--heal-config",
            str(REPO / "configs" / "train" / "tiny-moe-cpu.yaml"),
            "--heal-distill-alpha",
            "0,0.5",
            "--heal-lr",
            "3e-4",
            "--heal-warmup",
            "5",
        ]
    )
    pruned = tmp_path / "out" / "pruned-6"
    prune_to_six(source, pruned)
    driver = table_script.Driver(args)
    heal_config = driver.heal_config(pruned)
    config = load_config(heal_config)
    assert config.model_config() == from_pretrained(pruned).config
    assert config.init_from == str(pruned)
    (plain, plain_overrides), (distilled, distilled_overrides) = driver.heal_runs(pruned, "pruned to 6")
    assert plain.label == "pruned to 6 + 200-step heal (cross-entropy, lr 0.0003)"
    assert distilled.label == "pruned to 6 + 200-step heal (distilled, alpha 0.5, T 1, lr 0.0003)"
    assert plain.key != distilled.key and distilled.model == tmp_path / "out" / "runs" / distilled.key / "model"
    for overrides, distill in (
        (plain_overrides, None),
        (distilled_overrides, {"teacher": str(source / "model"), "alpha": 0.5, "temperature": 1.0}),
    ):
        config = load_config(heal_config, overrides)
        assert config.train.distill == distill  # the original model teaches the pruned one
        assert (config.train.steps, config.optim.lr, config.optim.warmup_steps) == (200, 3e-4, 5)
    row = {
        "experts": 8,
        "total_params": 3e6,
        "active_params": 1e6,
        "weight_bytes": 2**20,
        "decode_tps": 100.0,
        "decode_mode": "eager",
    }
    results = [
        {**row, "key": "original", "label": "original", "loss": 2.0},
        {**row, "key": "healed-pruned-6", "label": "pruned to 6 + heal", "experts": 6, "loss": 2.03},
        {**row, "key": "student-distilled-a0.5-t1", "label": "distilled", "experts": None, "loss": 2.5},
        {**row, "key": "student-scratch", "label": "scratch", "experts": None, "loss": 2.6},
    ]
    text = table_script.table(results, args)
    assert "| pruned to 6 + heal | 6 | 3.0M | 1.0M | 1.0 MiB | 100 | 2.0300 | +1.50% |" in text
    assert "pruned to 6 + heal: +1.50% of the original's loss" in text
    assert "pruning criterion: router_mass;" in text
    assert "distilled vs from scratch: +0.1000 nats better" in text
