"""Training building blocks in one process: config loading and overrides, schedules, FLOPs, optimizer groups,
activation checkpointing, the non-finite guard and checkpoint bookkeeping; compiled training against eager (in a
worker process, since the trainer joins a process group: `python tests/test_train.py compiled_vs_eager <workdir>`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moeformer.errors import ConfigError
from moeformer.models.config import ModelConfig
from moeformer.models.model import build_model
from moeformer.models.params import count_params
from moeformer.training import run_checkpoints as checkpointing
from moeformer.training.activation_checkpointing import apply_activation_checkpointing, checkpointed_modules
from moeformer.training.config import OptimConfig, RunConfig, load_config
from moeformer.training.metrics import flops_per_token, read_metrics
from moeformer.training.optim import expert_parameters, param_groups
from moeformer.training.run_checkpoints import CheckpointError, CheckpointManager, rng_state, set_rng_state, verify
from moeformer.training.schedule import lr_multiplier
from moeformer.training.trainer import NonFiniteGuard, NonFiniteLossError, deepspeed_config
from tests.numerics import assert_adamw_weights_agree, assert_curves_agree, trained_loss_bound
from tests.workers import REPO, worker_env

TINY = {
    "name": "tiny-moe",
    "dim": 32,
    "n_layers": 3,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_dim": 64,
    "vocab_size": 64,
    "moe": {"num_experts": 4, "top_k": 2, "ffn_dim": 32},
}


# ---- config -----------------------------------------------------------------------------------------------------
def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny-moe", "dim": 64}, "optim": {"lr": 1e-3}}))
    config = load_config(
        path,
        [
            "--optim.lr=2e-3",
            "--train.zero_stage",
            "3",
            "--model.moe.top_k=1",
            "--checkpoint.resume=auto",
            "--train.peak_tflops=null",
        ],
    )
    assert config.optim.lr == 2e-3 and isinstance(config.train.zero_stage, int) and config.train.zero_stage == 3
    assert config.checkpoint.resume == "auto" and config.train.peak_tflops is None
    model = config.model_config()
    assert model.dim == 64 and model.moe.top_k == 1 and model.moe.num_experts == 8


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--optim.lrr=1"], "optim.lrr"),
        (["--bogus=1"], "bogus"),
        (["--train.zero.stage=1"], "train.zero"),
        (["--model.dimm=3"], "model.dimm"),
        (["--model.moe.topk=1"], "topk"),
    ],
)
def test_unknown_keys_name_the_key(overrides, key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.checkpoint_every_k=3"], "'train.checkpoint_every_k' is now 'train.activation_checkpointing_every'"),
        (["--model.attention_types=[linear]"], "attention type 'linear' is now called 'vanilla'"),
        (
            ["--model.linear_attention={mode: chunked}"],
            "model.linear_attention.mode is now model.linear_attention.backend",
        ),
    ],
)
def test_renamed_keys_name_the_new_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_parallel_section_is_the_parallel_config():
    from moeformer.parallel.config import ParallelConfig

    config = load_config(None, ["--parallel.tp=2", "--parallel.expert_tp=true"])
    assert config.parallel == ParallelConfig(tp=2, expert_tp=True)
    with pytest.raises(ConfigError, match="expert_tp needs tp > 1"):
        load_config(None, ["--parallel.expert_tp=true"])


def test_compile_option_from_yaml_and_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"compile": True}}))
    assert load_config(path).train.compile is True and load_config(path).train.compile_backend == "inductor"
    config = load_config(None, ["--train.compile=true", "--train.compile_backend=aot_eager"])
    assert config.train.compile is True and config.train.compile_backend == "aot_eager"
    assert load_config(None).train.compile is False
    with pytest.raises(TypeError, match="train.compile"):
        load_config(None, ["--train.compile=fast"])
    with pytest.raises(
        ConfigError,
        match=r"train.compile_mode=reduce-overhead replays CUDA graphs, which pipeline parallelism \(parallel.pp=2\) "
        r"does not support: .* use train.compile_mode=default or max-autotune-no-cudagraphs",
    ):
        load_config(None, ["--train.compile=true", "--train.compile_mode=reduce-overhead", "--parallel.pp=2"])
    assert load_config(None, ["--train.compile=true", "--parallel.pp=2"]).train.compile is True
    assert load_config(None, ["--parallel.pp=2"]).parallel.pp == 2  # pipeline parallelism alone is accepted
    with pytest.raises(ValueError, match="train.compile_backend must be one of .*'inductor'.*got 'inductr'"):
        load_config(None, ["--train.compile=true", "--train.compile_backend=inductr"])
    flex = ["--train.compile=true", "--model.attn_backend=flex"]
    with pytest.raises(ConfigError, match="model.attn_backend=flex trains on wrong gradients"):
        load_config(None, flex)
    assert load_config(None, [*flex, "--train.compile_backend=aot_eager"]).train.compile is True
    graphs = load_config(None, ["--train.compile=true", "--train.compile_mode=reduce-overhead"])
    assert graphs.train.compile_mode == "reduce-overhead" and load_config(None).train.compile_mode == "default"
    with pytest.raises(ConfigError, match="train.compile_mode must be one of .*'reduce-overhead'.*got 'cudagraphs'"):
        load_config(None, ["--train.compile=true", "--train.compile_mode=cudagraphs"])
    with pytest.raises(ConfigError, match="train.compile_mode=reduce-overhead needs train.compile=true"):
        load_config(None, ["--train.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match="train.compile_backend=aot_eager takes only compile_mode=default"):
        load_config(
            None, ["--train.compile=true", "--train.compile_mode=max-autotune", "--train.compile_backend=aot_eager"]
        )


def test_pipeline_refuses_zero_stages_its_engine_cannot_run():
    with pytest.raises(
        ValueError,
        match=r"parallel.pp=2 needs train.zero_stage 0 or 1 \(DeepSpeed's pipeline engine "
        r"does not run ZeRO-2\)",
    ):
        load_config(None, ["--parallel.pp=2", "--train.zero_stage=2"])
    assert load_config(None, ["--parallel.pp=2", "--parallel.ep=2", "--train.zero_stage=1"]).parallel.pp == 2


def test_unknown_key_in_file_and_bad_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"seq_length": 4}}))
    with pytest.raises(KeyError, match=r"data\.seq_length"):
        load_config(path)
    with pytest.raises(ValueError, match="train.zero_stage"):
        load_config(None, ["--train.zero_stage=4"])
    with pytest.raises(ValueError, match="optim.schedule"):
        load_config(None, ["--optim.schedule=linear"])
    with pytest.raises(ValueError, match="data.start_batch must be >= 0"):
        load_config(None, ["--data.start_batch=-1"])
    with pytest.raises(ValueError, match="checkpoint.every=5 saves checkpoints; checkpoint.enabled=false"):
        load_config(None, ["--checkpoint.enabled=false", "--checkpoint.every=5"])
    with pytest.raises(TypeError, match="train.steps"):
        load_config(None, ["--train.steps=many"])
    with pytest.raises(TypeError, match="'model' must be a mapping"):
        load_config(None, ["--model=tiny-moe"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_train_script_reports_bad_key_without_traceback():
    env = worker_env()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/train.py"), "--optim.lrr=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown config key 'optim.lrr'" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_refuses_configuration_changes_unless_named(tmp_path):
    from moeformer.errors import ResumeConfigError
    from moeformer.training.config import resume_changes, run_identity

    facts = {"tokenizer": "byte", "vocab_size": 258, "train_tokens": 1000, "val_tokens": 100}
    saved = run_identity(load_config(None, {"model": dict(TINY)}), facts, 2)
    changed = load_config(
        None,
        {
            "model": dict(TINY),
            "data.seq_len": 64,
            "data.micro_batch_size": 4,
            "train.seed": 1,
            "optim.lr": 1e-3,
            "train.log_every": 5,
            "checkpoint.every": 7,
            "train.compile": True,
            "parallel.ep_chunks": 4,
            "data.start_batch": 9,  # a fresh run's data position: a resume takes its checkpoint's
            "out_dir": str(tmp_path),
        },
    )
    with pytest.raises(ResumeConfigError) as refused:
        resume_changes(saved, run_identity(changed, {**facts, "train_tokens": 2000}, 4), [])
    message = str(refused.value)
    for change in (
        "data.seq_len: 256 -> 64",
        "data.micro_batch_size: 8 -> 4",
        "train.seed: 0 -> 1",
        "optim.lr: 0.0003 -> 0.001",
        "data.train_tokens: 1000 -> 2000",
        "world_size: 2 -> 4",
        "--resume-allow data.micro_batch_size,data.seq_len,data.train_tokens,optim.lr,train.seed,world_size",
    ):
        assert change in message
    free = (
        "train.log_every",
        "checkpoint.every",
        "train.compile",
        "parallel.ep_chunks",
        "data.start_batch",
        "out_dir:",
    )
    assert not any(key in message for key in free)
    # the model section compares resolved fields: spelling out a zoo value is no change, changing one is
    spelled = load_config(None, {"model": {**TINY, "moe": {**TINY["moe"], "router": "softmax"}}})
    assert resume_changes(saved, run_identity(spelled, facts, 2), []) == {}
    with pytest.raises(ResumeConfigError, match=r"model.moe.top_k: 2 -> 1"):
        resume_changes(
            saved,
            run_identity(load_config(None, {"model": {**TINY, "moe": {**TINY["moe"], "top_k": 1}}}), facts, 2),
            [],
        )
    allowed = resume_changes(saved, run_identity(changed, facts, 2), ["data", "train.seed", "optim.lr"])  # sections
    assert allowed == {
        "data.seq_len": [256, 64],
        "data.micro_batch_size": [8, 4],
        "train.seed": [0, 1],
        "optim.lr": [3e-4, 1e-3],
    }
    with pytest.raises(ResumeConfigError, match="checkpoint.resume_allow names unknown keys: optim.lrr"):
        resume_changes(saved, saved, ["optim.lrr"])
    assert resume_changes(saved, saved, ["train.compile", "checkpoint"]) == {}


def test_train_script_resume_options_become_config_keys():
    sys.path.insert(0, str(REPO / "scripts"))
    import train

    args, overrides = train.parse_args(
        ["--resume", "auto", "--resume-allow", "optim.lr,train.steps", "--optim.lr=1e-3"]
    )
    config = load_config(args.config, overrides)
    assert config.checkpoint.resume == "auto" and config.checkpoint.resume_allow == ["optim.lr", "train.steps"]
    assert load_config(None, ["--checkpoint.resume_allow=[data, optim.lr]"]).checkpoint.resume_allow == [
        "data",
        "optim.lr",
    ]
    with pytest.raises(TypeError, match="checkpoint.resume_allow"):
        load_config(None, ["--checkpoint.resume_allow=3"])


def test_quickstart_resume_keeps_the_run_it_resumes(tmp_path):
    """scripts/quickstart.sh in a copy of the repository whose set-up, python and torchrun are stubs."""
    repo, log = tmp_path / "repo", tmp_path / "calls.log"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "quickstart.sh", repo / "scripts")
    (repo / "scripts" / "setup_env.sh").write_text("")
    stubs = repo / "stubs"
    stubs.mkdir()
    for name in ("python", "torchrun"):
        (stubs / name).write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >> "{log}"\n')
        (stubs / name).chmod(0o755)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text(f'export PATH="{stubs}:$PATH"\n')
    (repo / "data" / "stdlib-byte").mkdir(parents=True)
    (repo / "data" / "stdlib-byte" / "meta.json").write_text("{}")
    run = repo / "runs" / "tiny-moe-cpu"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    for args in (["--resume", "auto"], ["--resume=auto"], ["--checkpoint.resume=auto"]):
        subprocess.run(["bash", str(repo / "scripts" / "quickstart.sh"), *args], check=True, capture_output=True)
        assert (run / "metrics.jsonl").is_file(), args
    torchrun = [line for line in log.read_text().splitlines() if line.startswith("torchrun")]
    assert len(torchrun) == 3 and torchrun[0].endswith("--resume auto")
    subprocess.run(
        ["bash", str(repo / "scripts" / "quickstart.sh"), "--train.steps=5"], check=True, capture_output=True
    )
    assert not run.exists()  # without --resume the quick start begins a fresh run


def test_shipped_train_configs_load():
    for path in sorted((REPO / "configs/train").glob("*.yaml")):
        assert isinstance(load_config(path), RunConfig)


def test_shipped_deepspeed_configs_merge():
    for path in sorted((REPO / "configs/deepspeed").glob("*.json")):
        config = load_config(None, [f"--deepspeed.config={path}"])
        ds = deepspeed_config(config, dp_size=2)
        assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] in (2, 3), path


def test_deepspeed_config_built_and_merged(tmp_path):
    config = load_config(
        None, ["--data.micro_batch_size=4", "--train.grad_accum=3", "--train.zero_stage=2", "--train.dtype=fp32"]
    )
    ds = deepspeed_config(config, dp_size=2)
    assert ds["train_batch_size"] == 24 and ds["zero_optimization"]["stage"] == 2 and not ds["bf16"]["enabled"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "gradient_clipping": 0.5}))
    config.deepspeed.config = str(path)
    merged = deepspeed_config(config, dp_size=2)
    assert merged["zero_optimization"] == {**ds["zero_optimization"], "reduce_bucket_size": 123}
    assert merged["gradient_clipping"] == 0.5
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(config, dp_size=2)


# ---- schedules and FLOPs ----------------------------------------------------------------------------------------
def test_warmup_cosine():
    c = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_multiplier(s, 100, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)


def test_warmup_stable_decay():
    c = OptimConfig(schedule="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    lrs = [lr_multiplier(s, 100, c) for s in range(100)]
    assert lrs[4] == 1.0 and all(v == 1.0 for v in lrs[5:80])
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:])) and lrs[-1] == pytest.approx(0.0)
    assert lr_multiplier(50, 100, OptimConfig(schedule="constant", warmup_steps=0)) == 1.0


def test_flops_per_token_counts_active_params_and_attention():
    dense = ModelConfig.from_name("tiny-dense")
    params = count_params(dense).total - dense.vocab_size * dense.dim
    assert flops_per_token(dense, 128) == 6 * params + 12 * dense.n_layers * dense.n_heads * dense.head_dim * 128
    moe = ModelConfig.from_name("tiny-moe")
    counts = count_params(moe)
    assert counts.active < counts.total
    assert flops_per_token(moe, 1) == 6 * (counts.active - moe.vocab_size * moe.dim) + 12 * moe.n_layers * moe.dim


def test_flops_per_token_counts_each_attention_kind():
    """Growth with the sequence length comes from softmax and MLA layers only (within a sliding window); linear
    attention layers add their state's fixed cost."""
    dense = ModelConfig.from_name("tiny-dense")
    heads, head_dim = dense.n_heads, dense.head_dim
    growth = lambda config: flops_per_token(config, 300) - flops_per_token(config, 100)  # noqa: E731
    softmax_growth = 12 * heads * head_dim * 200
    hybrid = dense.replace(attention_types=["retnet", "softmax"], n_layers=4)
    assert growth(hybrid) == 2 * softmax_growth
    assert growth(dense.replace(sliding_window=100)) == 0
    softmax_only = dense.replace(n_layers=4)
    mixing = lambda config: flops_per_token(config, 100) - 6 * count_params(config).active  # noqa: E731
    assert mixing(hybrid) - mixing(softmax_only) == 2 * (3 * 2 * 2 * heads * head_dim**2 - 12 * heads * head_dim * 100)
    mla = dense.replace(
        attention_types=["mla"], mla={"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
    )
    assert growth(mla) == dense.n_layers * 6 * heads * (8 + 4 + 8) * 200


# ---- optimizer groups -------------------------------------------------------------------------------------------
def test_param_groups_separate_experts_and_follow_deepspeed_tags():
    model = build_model(ModelConfig.from_dict(dict(TINY)))
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    experts = [p for n, p in model.named_parameters() if n.endswith(("experts.w_in", "experts.w_out"))]
    assert {id(p) for p in groups["experts"]["params"]} == {id(p) for p in experts} and len(experts) == 6
    assert groups["no_decay"]["weight_decay"] == 0.0 and all(p.dim() == 1 for p in groups["no_decay"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    for p in expert_parameters(model):  # DeepSpeed's expert tag, as expert parallelism sets it
        p.allreduce, p.group_name = False, "ep_size_2"
    split = param_groups(model, 0.1)
    moe_groups = [g for g in split if g.get("moe")]
    assert [g["name"] for g in moe_groups] == ["ep_size_2"]
    assert {id(p) for p in moe_groups[0]["params"]} == {id(p) for p in experts}
    assert all(not g.get("moe") for g in split if any(id(p) not in {id(e) for e in experts} for p in g["params"]))


# ---- activation checkpointing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, expected", [("none", 0), ("full", 3), ("every_k", 2), ("attention", 3), ("moe", 3)])
def test_activation_checkpointing_same_loss_and_grads(mode, expected):
    torch.manual_seed(0)
    config = ModelConfig.from_dict(dict(TINY))
    reference = build_model(config)
    model = build_model(config)
    model.load_state_dict(reference.state_dict())
    keys = list(model.state_dict())
    wrapped = apply_activation_checkpointing(model, mode, every_k=2)
    assert len(wrapped) == expected == len(checkpointed_modules(model, mode, 2)) and list(model.state_dict()) == keys
    calls = {"n": 0}
    for m in wrapped:  # a submodule's hook also fires when the wrapped forward is recomputed
        next(m.children()).register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    ids = torch.randint(0, config.vocab_size, (2, 16))
    docs = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    out_ref = reference(ids, labels=ids, document_ids=docs)
    out = model(ids, labels=ids, document_ids=docs)
    out_ref.loss.backward()
    forwards = calls["n"]
    out.loss.backward()
    assert calls["n"] == 2 * forwards == 2 * expected  # each checkpointed module ran again in backward
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=0, atol=0)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-7, msg=name)


# ---- failure handling -------------------------------------------------------------------------------------------
def test_nonfinite_guard_counts_and_stops():
    guard = NonFiniteGuard(max_in_row=3)
    for finite in (False, False, True, False, False):
        guard.update(finite, step=1)
    assert guard.in_row == 2 and guard.total == 4
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        guard.update(False, step=9)


class _FakeEngine:
    """Writes one file per save, like DeepSpeed would, so the bookkeeping around it can be tested alone."""

    module = torch.nn.Linear(2, 2)  # the wrapped model: not parallelised, so no expert files or layout
    checkpoint_engine = None  # DeepSpeed's file writer (unused here)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert not save_latest
        (Path(root) / tag).mkdir()
        torch.save({"w": torch.arange(1000.0), **client_state}, Path(root) / tag / "model.pt")


def test_checkpoint_manager_latest_keep_last_and_corruption(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert manager.resolve("auto") is None and manager.resolve(None) is None
    for step in (3, 6, 9):
        manager.save(_FakeEngine(), step, {"data": {"epoch": 0, "index": step}})
    (tmp_path / "ckpt" / "step_00000012").mkdir()  # an interrupted save: no COMPLETE marker
    assert [p.name for p in manager.complete_checkpoints()] == ["step_00000006", "step_00000009"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000009"
    assert manager.resolve("auto").name == "step_00000009"
    path = manager.resolve("auto")
    assert verify(path)["step"] == 9
    state = torch.load(path / "trainer_state_rank0.pt", weights_only=True)
    assert state["data"] == {"epoch": 0, "index": 9}

    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="contents of model.pt changed"):
        verify(path)
    (path / "model.pt").write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="model.pt has"):
        verify(path)
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify(path)
    assert manager.resolve("auto").name == "step_00000006"  # latest points at an incomplete one: newest complete
    with pytest.raises(CheckpointError, match="does not exist"):
        manager.resolve(str(tmp_path / "nowhere"))


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class _Killed(BaseException):
    """Stands for a SIGKILL in a one-process test: nothing after the raise runs."""


class _KilledAfterWriting(_FakeEngine):
    def save_checkpoint(self, root, tag, client_state, save_latest):
        super().save_checkpoint(root, tag, client_state, save_latest)
        raise _Killed


def test_a_complete_checkpoint_is_replaced_only_once_its_replacement_is_complete(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=2)
    manager.save(_FakeEngine(), 3, {"data": {}})
    with pytest.raises(_Killed):  # a save of the same step (a resumed run redoing it) killed mid-way
        manager.save(_KilledAfterWriting(), 3, {"data": {}})
    assert verify(root / "step_00000003")["step"] == 3
    assert CheckpointManager(root).resolve("auto") == root / "step_00000003"

    # replaced by an atomic exchange where the system has one; else by two renames, and a kill between them leaves
    # both saves complete, neither named step_00000003
    manager.save(_FakeEngine(), 3, {"data": {"epoch": 2}})
    assert torch.load(root / "step_00000003" / "trainer_state_rank0.pt", weights_only=True)["data"] == {"epoch": 2}
    assert _names(root) == ["latest", "step_00000003"]
    monkeypatch.setattr(checkpointing, "exchange_dirs", lambda a, b: False)
    rename, calls = os.rename, []

    def rename_then_die(src, dst):
        calls.append(Path(dst).name)
        rename(src, dst)
        if len(calls) == 1:
            raise _Killed

    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(_Killed):
        manager.save(_FakeEngine(), 3, {"data": {"epoch": 1}})
    monkeypatch.undo()
    assert calls == [".replaced-step_00000003"] and not (root / "step_00000003").exists()
    path = CheckpointManager(root).resolve("auto")  # the complete new save is moved into place
    assert path == root / "step_00000003" and verify(path)["step"] == 3
    assert torch.load(path / "trainer_state_rank0.pt", weights_only=True)["data"] == {"epoch": 1}
    manager.save(_FakeEngine(), 6, {"data": {}})
    assert _names(root) == ["latest", "step_00000003", "step_00000006"]  # the replaced one is gone


def test_resume_auto_falls_back_past_checkpoints_that_do_not_verify(tmp_path):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=3)
    for step in (3, 6, 9):
        manager.save(_FakeEngine(), step, {"data": {}})
    _flip_a_byte(root / "step_00000009" / "model.pt")
    (root / "step_00000006" / "COMPLETE").write_text("{")
    with pytest.warns(UserWarning) as warned:
        assert CheckpointManager(root).resolve("auto") == root / "step_00000003"
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2 and "step_00000009 is corrupt: the contents of model.pt changed" in messages[0]
    assert "step_00000006: unreadable COMPLETE marker" in messages[1]
    _flip_a_byte(root / "step_00000003" / "model.pt")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"no checkpoint in .*ckpt verifies: "):
        CheckpointManager(root).resolve("auto")


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    root = tmp_path / "ckpt"
    for step in (3, 6, 9):
        CheckpointManager(root, keep_last=2).save(_FakeEngine(), step, {"data": {}})
    _flip_a_byte(root / "step_00000009" / "model.pt")
    manager = CheckpointManager(root, keep_last=1)
    with pytest.warns(UserWarning, match="step_00000009 is corrupt"):
        assert manager.resolve("auto") == root / "step_00000006"
    manager.save(_FakeEngine(), 7, {"data": {}})  # the run goes on from step 6
    assert _names(root) == ["latest", "step_00000007", "step_00000009"]  # older ones pruned, newer ones kept
    assert (root / "latest").read_text() == "step_00000007" and verify(root / "step_00000007")["step"] == 7
    assert manager.resolve("auto") == root / "step_00000007"


def test_checkpoint_files_are_durable_before_the_marker_and_markers_readable_by_the_group(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    fsync, synced = os.fsync, []

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    umask = os.umask(0o022)
    try:
        CheckpointManager(root).save(_FakeEngine(), 3, {"data": {}})
    finally:
        os.umask(umask)
    staging = os.path.realpath(root / ".staging-step_00000003")
    marker = next(i for i, p in enumerate(synced) if os.path.basename(p).startswith(".COMPLETE."))
    assert {os.path.join(staging, name) for name in ("model.pt", "trainer_state_rank0.pt")} | {staging} <= set(
        synced[:marker]
    )  # every file and the directory itself, before the marker
    assert os.path.realpath(root) in synced[marker + 1 :]  # the rename into place and `latest` are durable too
    path = root / "step_00000003"
    modes = {
        name: (p.stat().st_mode & 0o777)
        for name, p in (("model", path / "model.pt"), ("marker", path / "COMPLETE"), ("latest", root / "latest"))
    }
    assert modes == {"model": 0o644, "marker": 0o644, "latest": 0o644}


def test_nonfinite_weights_or_optimizer_state_are_never_saved(tmp_path):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=1)
    manager.save(_FakeEngine(), 3, {"data": {}})
    engine = _FakeEngine()
    engine.module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        engine.module.weight[0, 1] = float("nan")
    with pytest.raises(
        CheckpointError,
        match=r"not saving checkpoint step_00000006: the weights or optimizer "
        r"state hold NaN/inf \(rank 0: weight\); the newest good "
        r"checkpoint stays step_00000003",
    ):
        manager.save(engine, 6, {"data": {}})
    engine.module = torch.nn.Linear(2, 2)
    engine.basic_optimizer = torch.optim.AdamW(engine.module.parameters())
    engine.module(torch.ones(1, 2)).sum().backward()
    engine.basic_optimizer.step()
    engine.basic_optimizer.state[engine.module.bias]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(CheckpointError, match="optimizer group 0 tensor 1 exp_avg_sq"):
        manager.save(engine, 6, {"data": {}})
    assert _names(root) == ["latest", "step_00000003"] and verify(root / "step_00000003")["step"] == 3


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_plot_run_writes_pngs(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import plot_run

    records = [
        {
            "step": s,
            "split": "train",
            "ce_loss": 5.0 - 0.1 * s,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens_per_s": 100.0,
            "expert_load": [[0.5, 0.25, 0.25, 0.0]] * 2,
        }
        for s in range(1, 6)
    ]
    records.append({"step": 5, "split": "val", "loss": 4.6})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = plot_run.main([str(tmp_path)])
    assert [p.name for p in written] == ["loss.png", "training.png", "expert_load.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    assert plot_run.series(records + [{"step": 5, "split": "train", "ce_loss": 9.0}], "train", "ce_loss")[1][-1] == 9.0


# ---- compiled training ------------------------------------------------------------------------------------------
COMPILE_RUNS = {
    "eager": {},
    "compiled": {"train.compile": True},
    "compiled_ckpt": {"train.compile": True, "train.activation_checkpointing": "moe"},
}


def scenario_compiled_vs_eager(work: Path) -> dict:
    """Worker: the same tiny-moe run (fp32, ZeRO 0, one process) eager, compiled, and compiled with the MoE sublayers
    checkpointed (they stay eager); per-step losses, val loss and how many graphs dynamo captured."""
    from torch._dynamo.utils import counters

    from moeformer.training.trainer import Trainer

    out = {}
    for name, overrides in COMPILE_RUNS.items():
        # aot_eager: dynamo + AOT autograd (the forward/backward graphs) without inductor's C++ code generation,
        # which takes ~35 s for this run on 2 cores
        config = load_config(
            None,
            {
                "out_dir": str(work / name),
                "data.dir": str(work / "data"),
                "data.seq_len": 32,
                "data.micro_batch_size": 2,
                "train.dtype": "fp32",
                "train.zero_stage": 0,
                "train.steps": 4,
                "train.eval_every": 0,
                "train.eval_batches": 1,
                "train.progress_bar": False,
                "optim.warmup_steps": 1,
                "optim.lr": 3e-3,
                "train.compile_backend": "aot_eager",
                "model": {**TINY, "vocab_size": 258},
                **overrides,
            },
        )
        torch._dynamo.reset()
        counters.clear()
        summary = Trainer(config).train()
        out[name] = {
            "losses": summary["losses"],
            "val_loss": summary["val_loss"],
            "graphs": counters["stats"]["unique_graphs"],
        }
    return out


def test_compiled_training_matches_eager_and_exports_same_names(tmp_path):
    from safetensors.torch import load_file

    from moeformer.models.model import from_pretrained
    from moeformer.training.data import prepare_corpus

    prepare_corpus(tmp_path / "data", max_files=20, val_fraction=0.2)
    env = worker_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, "compiled_vs_eager", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    runs = json.loads((tmp_path / "compiled_vs_eager.json").read_text())
    eager = runs["eager"]
    assert eager["graphs"] == 0 and len(eager["losses"]) == 4
    reference = build_model(load_config(tmp_path / "eager" / "config.yaml").model_config()).state_dict()
    for name in ("compiled", "compiled_ckpt"):
        run = runs[name]
        assert run["graphs"] > 0, name  # dynamo really captured the forward
        # aot_eager keeps eager's kernels (seen: identical); compiled graphs may sum in another order: the bounds of
        # tests/numerics.py for runs that differ in summation order only
        assert run["losses"].keys() == eager["losses"].keys()
        curve = [eager["losses"][step] for step in sorted(eager["losses"], key=int)]
        assert_curves_agree([run["losses"][step] for step in sorted(eager["losses"], key=int)], curve)
        assert abs(run["val_loss"] - eager["val_loss"]) <= trained_loss_bound(curve), name
        assert sorted(load_file(tmp_path / name / "model" / "model.safetensors")) == sorted(
            load_file(tmp_path / "eager" / "model" / "model.safetensors")
        )  # no `_orig_mod.` prefixes
        exported = from_pretrained(tmp_path / name / "model").state_dict()
        assert list(exported) == list(reference)
        lrs = [r["lr"] for r in read_metrics(tmp_path / "eager") if r["split"] == "train"]
        assert_adamw_weights_agree(
            exported,
            from_pretrained(tmp_path / "eager" / "model").state_dict(),
            lrs,
            (OptimConfig.beta1, OptimConfig.beta2),
        )


# ---- expert-load telemetry ----------------------------------------------------------------------------------------
LOAD_TOKENS = 2 * 32  # micro-batch 2 x seq 32, one micro-batch per step


def scenario_expert_load(work: Path) -> dict:
    """Worker: two steps of tiny-moe (3 MoE layers, 4 experts, top-2, capacity factor 1) with a hand-built router
    that sends every token to experts 0 and 1; returns the train records."""
    from moeformer.layers.moe import router
    from moeformer.training.trainer import Trainer

    def first_two_experts(scores, top_k, **kwargs):
        indices = torch.tensor([0, 1], device=scores.device).expand(scores.shape[0], 2)
        return indices, scores.gather(-1, indices)

    router.topk_routing = first_two_experts
    moe = {"num_experts": 4, "top_k": 2, "ffn_dim": 32, "dispatcher": "capacity", "capacity_factor": 1.0}
    config = load_config(
        None,
        {
            "out_dir": str(work / "run"),
            "data.dir": str(work / "data"),
            "data.seq_len": 32,
            "data.micro_batch_size": 2,
            "train.dtype": "fp32",
            "train.zero_stage": 0,
            "train.steps": 2,
            "train.eval_every": 0,
            "train.eval_batches": 1,
            "train.log_every": 1,
            "train.progress_bar": False,
            "model": {**TINY, "vocab_size": 258, "moe": moe},
        },
    )
    Trainer(config).train()
    return [r for r in read_metrics(work / "run") if r["split"] == "train"]


def test_expert_load_telemetry_counts_exactly(tmp_path):
    from moeformer.training.data import prepare_corpus

    prepare_corpus(tmp_path / "data", max_files=5, val_fraction=0.2)
    proc = subprocess.run(
        [sys.executable, __file__, "expert_load", str(tmp_path)],
        capture_output=True,
        text=True,
        env=worker_env(OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = json.loads((tmp_path / "expert_load.json").read_text())
    assert len(records) == 2
    n, layers = LOAD_TOKENS, 3
    capacity = n * 2 // 4  # ceil(1.0 * tokens * top_k / experts)
    for record in records:  # experts 0 and 1 get every token, keep `capacity` each, 2 and 3 get none
        assert record["expert_tokens_max"] == [n] * layers
        assert record["expert_tokens_mean"] == [n * 2 / 4] * layers
        assert record["expert_load_max_over_mean"] == [2.0] * layers
        assert record["experts_without_tokens"] == [2] * layers
        assert record["dropped_tokens"] == [2 * (n - capacity)] * layers
        assert record["dropped_share"] == [0.5] * layers
        assert record["expert_load"] == [[0.5, 0.5, 0.0, 0.0]] * layers


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    (workdir / f"{scenario}.json").write_text(json.dumps(globals()[f"scenario_{scenario}"](workdir)))
