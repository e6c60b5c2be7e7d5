"""Knowledge distillation: the chunked loss against the full-logits reference (value and gradients), the trainer's
mix at alpha 0 (plain training) and alpha 1 with the student as its own teacher (zero loss and gradients) on packed
documents with masked targets, the teacher checks (tokenizer, vocabulary, config), and a short run of the real
trainer with train.distill."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moeformer.errors import ConfigError
from moeformer.layers.lm_head import IGNORE_INDEX, distill_loss_reference, linear_distill_loss
from moeformer.models.checkpoint import save_pretrained
from moeformer.models.config import ModelConfig
from moeformer.models.model import CausalLM
from moeformer.training.config import load_config
from moeformer.training.data import TokenDataset, check_same_tokenizer, prepare_corpus
from moeformer.training.distill import DistillConfig, Distiller
from moeformer.training.metrics import read_metrics
from tests.workers import run_train


@pytest.mark.parametrize(
    "tokens, dim, teacher_dim, vocab, temperature, chunk",
    [(37, 16, 24, 50, 1.0, 8), (64, 8, 8, 33, 2.0, 64), (5, 4, 12, 7, 0.5, 2), (30, 12, 6, 96, 4.0, 7)],
)
def test_chunked_distill_loss_equals_the_full_logits_reference(tokens, dim, teacher_dim, vocab, temperature, chunk):
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, dim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, requires_grad=True)
    teacher_hidden, teacher_weight = (
        torch.randn(tokens, teacher_dim, generator=g),
        torch.randn(vocab, teacher_dim, generator=g),
    )
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[::3] = IGNORE_INDEX  # an instruction mask: these tokens count in neither loss
    mix = torch.rand(2, generator=g)
    results = []
    for fn in (linear_distill_loss, distill_loss_reference):
        args = (hidden, weight, teacher_hidden, teacher_weight, targets, temperature)
        ce, kl = fn(*args, chunk) if fn is linear_distill_loss else fn(*args)
        hidden.grad = weight.grad = None
        (mix[0] * ce + mix[1] * kl).backward()
        results.append((ce.detach(), kl.detach(), hidden.grad, weight.grad))
    for ours, ref in zip(*results, strict=True):  # fp32 sums over <= 96 logits: a few ulps of the values
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert results[0][1] > 0


def test_distill_loss_refuses_mismatched_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="vocabularies differ"):
        linear_distill_loss(h, w, h, torch.randn(11, 8), t)
    with pytest.raises(ValueError, match="disagree on the tokens"):
        linear_distill_loss(h, w, h[:3], w, t)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    prepare_corpus(root / "data", max_files=4, val_fraction=0.5)
    return root


def tiny(moe: bool, seed: int = 0) -> CausalLM:
    overrides = {"moe": {"num_experts": 4, "top_k": 2, "ffn_dim": 16}} if moe else {}
    torch.manual_seed(seed)
    model = CausalLM(
        ModelConfig(
            vocab_size=258,
            dim=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=48,
            max_seq_len=64,
            loss_chunk_size=24,
            **overrides,
        )
    )
    model.init_weights()
    return model


def distiller(corpus, teacher: CausalLM, alpha: float, temperature: float = 2.0) -> Distiller:
    path = corpus / f"teacher-{id(teacher)}"
    save_pretrained(teacher, path, format="native")
    (path / "meta.json").write_bytes((corpus / "data" / "meta.json").read_bytes())
    config = DistillConfig(str(path), alpha, temperature)
    return Distiller(config, teacher.config, corpus / "data", torch.device("cpu"), teacher.config.loss_chunk_size)


def packed_batch(corpus) -> dict[str, torch.Tensor]:
    """Two windows that span document boundaries (packed documents) with a few targets masked out."""
    dataset = TokenDataset.from_dir(corpus / "data", "train", 64)
    eos = json.loads((corpus / "data" / "meta.json").read_text())["eos_id"]
    starts = [i for i in range(len(dataset)) if (dataset.get_batch([i])["input_ids"][0, 1:] == eos).any()]
    batch = dataset.get_batch(starts[:2])
    assert (batch["document_ids"] > 0).any()
    batch["targets"] = batch["targets"].clone()  # a view of the same tokens as input_ids
    batch["targets"][:, :5] = IGNORE_INDEX
    return batch


def test_alpha_zero_is_plain_training(corpus):
    student = tiny(moe=True)
    batch = packed_batch(corpus)
    kwargs = dict(position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    plain = student(batch["input_ids"], targets=batch["targets"], return_logits=False, **kwargs)
    plain.loss.backward()
    expected = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    out = distiller(corpus, tiny(moe=False, seed=1), alpha=0.0).forward(student, student, batch, packed=True)
    out.loss.backward()
    assert out.distill_kl > 0 and torch.equal(out.ce_loss, plain.ce_loss) and torch.equal(out.loss, plain.loss)
    for name, p in student.named_parameters():  # the same operations in the same order: bitwise equal
        assert torch.equal(p.grad, expected[name]), name


def test_student_as_its_own_teacher_at_alpha_one_has_zero_loss_and_gradients(corpus):
    """The teacher runs on the same positions and document ids as the student (packed documents): any difference
    would show as a non-zero KL."""
    student = tiny(moe=False)
    out = distiller(corpus, copy.deepcopy(student), alpha=1.0).forward(
        student, student, packed_batch(corpus), packed=True
    )
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.distill_kl.item() == 0.0 and out.ce_loss > 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in student.parameters())


def test_teacher_checks_name_the_mismatch(corpus, tmp_path):
    teacher = tiny(moe=False)
    save_pretrained(teacher, tmp_path / "t", format="native")
    meta = json.loads((corpus / "data" / "meta.json").read_text())
    (tmp_path / "t" / "meta.json").write_text(json.dumps({**meta, "tokenizer": "bpe", "vocab_size": 4096}))
    with pytest.raises(ValueError, match="trained with another tokenizer than the data .*: tokenizer 'bpe' vs 'byte'"):
        check_same_tokenizer(tmp_path / "t", corpus / "data", "teacher")
    (tmp_path / "t" / "meta.json").write_text(json.dumps(meta))
    check_same_tokenizer(tmp_path / "t", corpus / "data", "teacher")
    student = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="has vocab_size 258, the student 300"):
        Distiller(DistillConfig(str(tmp_path / "t")), student, corpus / "data", torch.device("cpu"), 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Distiller(DistillConfig(str(tmp_path / "none")), student, corpus / "data", torch.device("cpu"), 64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.distill": {"teacher": "t", "alpha": 1.5}}, r"train.distill.alpha must be in \[0, 1\]"),
        ({"train.distill": {"teacher": "t", "temperature": 0}}, "train.distill.temperature must be positive"),
        ({"train.distill": {"teacher": "t", "beta": 1}}, "unknown config key 'train.distill.beta'"),
        ({"train.distill": {"alpha": 0.5}}, "train.distill needs `teacher`"),
        ({"train.distill": {"teacher": "t"}, "parallel.pp": 2}, "train.distill is not supported with parallel.pp=2"),
        ({"train.distill": {"teacher": "t"}, "train.zero_stage": 3}, "train.zero_stage=3"),
    ],
)
def test_distill_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert DistillConfig.from_dict({"teacher": "t", "alpha": 1}).alpha == 1.0


@pytest.mark.distributed
def test_trainer_runs_with_distillation_and_logs_the_kl(corpus, tmp_path):
    """Two gloo ranks, each with its replica of the teacher."""
    teacher = tiny(moe=True)
    save_pretrained(teacher, tmp_path / "teacher", format="native")
    (tmp_path / "teacher" / "meta.json").write_bytes((corpus / "data" / "meta.json").read_bytes())
    overrides = [
        f"--out_dir={tmp_path / 'run'}",
        f"--data.dir={corpus / 'data'}",
        "--data.seq_len=32",
        "--data.micro_batch_size=1",
        "--train.steps=3",
        "--train.dtype=fp32",
        "--train.zero_stage=0",
        "--train.eval_batches=1",
        "--train.progress_bar=false",
        "--optim.warmup_steps=1",
        "--model.name=tiny-dense",
        "--model.vocab_size=258",
        "--model.dim=32",
        "--model.n_layers=2",
        "--model.ffn_dim=48",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.max_seq_len=64",
        f"--train.distill={{teacher: {tmp_path / 'teacher'}, alpha: 0.7, temperature: 2.0}}",
    ]
    proc = run_train(overrides, nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    train = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(train) == 3
    for r in train:
        assert r["distill_kl"] > 0
        assert r["loss"] == pytest.approx(0.3 * r["ce_loss"] + 0.7 * 4.0 * r["distill_kl"], rel=1e-5)
    assert (tmp_path / "run" / "model" / "config.yaml").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bf16_distill_loss_on_cuda_is_bounded_by_the_rounding_of_the_logits(temperature):
    """bf16 GEMMs round each logit to 8 significant bits (relative 2^-8): cross-entropy and KL move by at most a few
    times that of the largest logit (divided by T for the KL); gradients compared in relative norm."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(8192, 256, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    teacher_hidden = torch.randn(3000, 128, device="cuda", generator=g).bfloat16()
    teacher_weight = (torch.randn(8192, 128, device="cuda", generator=g) * 0.1).bfloat16()
    targets = torch.randint(0, 8192, (3000,), device="cuda", generator=g)
    targets[:100] = IGNORE_INDEX
    ce, kl = linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, targets, temperature, 1024)
    (ce + kl).backward()
    grads = hidden.grad.float(), weight.grad.float()
    ref_h, ref_w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref_ce, ref_kl = distill_loss_reference(
        ref_h, ref_w, teacher_hidden.float(), teacher_weight.float(), targets, temperature
    )
    (ref_ce + ref_kl).backward()
    largest = max(
        (ref_h @ ref_w.t()).abs().max().item(), (teacher_hidden.float() @ teacher_weight.float().t()).abs().max().item()
    )
    bound = 4 * 2**-8 * largest
    assert abs(ce.item() - ref_ce.item()) <= bound and abs(kl.item() - ref_kl.item()) <= bound / temperature
    for ours, ref in zip(grads, (ref_h.grad, ref_w.grad), strict=True):
        assert (ours - ref).norm() <= 0.02 * ref.norm()
