"""The generation and evaluation entry points on real checkpoint directories: a training-style export (native,
with the corpus tokenizer beside it) and a Hugging Face export with its own tokenizer.json."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from moeformer.models import ModelConfig, build_model
from moeformer.training.data import prepare_corpus
from moeformer.training.tokenizer import load_tokenizer
from tests.workers import script


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny MoE saved the way a training run exports it: native weights + the byte corpus's meta.json."""
    root = tmp_path_factory.mktemp("export")
    prepare_corpus(root / "data", max_files=4, val_fraction=0.5)
    torch.manual_seed(0)
    config = ModelConfig.from_name(
        "tiny-moe", n_layers=2, dim=64, n_heads=4, ffn_dim=128, vocab_size=258, moe={"ffn_dim": 64}, max_seq_len=256
    )
    build_model(config).save_pretrained(root / "model", format="native")
    shutil.copyfile(root / "data" / "meta.json", root / "model" / "meta.json")
    return root


def test_generate_script_native_export(exported, capsys):
    texts = script("generate").main(
        [
            "--model",
            str(exported / "model"),
            "--prompt",
            "def ",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert len(texts) == 2 and texts[0] == texts[1]  # greedy: both rows alike
    assert out.count("---- sample") == 2 and "tokens/s" in out
    quantized = script("generate").main(
        [
            "--model",
            str(exported / "model"),
            "--prompt",
            "def ",
            "--num-samples",
            "1",
            "--max-new-tokens",
            "4",
            "--quantize",
            "int8",
            "--temperature",
            "0",
        ]
    )
    assert len(quantized) == 1


def test_eval_loss_script_scores_every_window_and_int8_stays_close(exported, capsys):
    args = [
        "--model",
        str(exported / "model"),
        "--data",
        str(exported / "data"),
        "--dtype",
        "fp32",
        "--seq-len",
        "64",
        "--batch",
        "8",
    ]
    full = script("eval_loss").main(args)
    int8 = script("eval_loss").main(args + ["--quantize", "int8"])
    meta = json.loads((exported / "data" / "meta.json").read_text())
    windows = (meta["splits"]["val"]["tokens"] - 1) // 64
    assert full["tokens"] == int8["tokens"] == windows * 64
    assert math.isfinite(full["loss"]) and full["loss"] > 0
    # per-channel int8 moves each weight by at most half a step (|w| / 254); the loss of a random tiny model moves
    # far less than 1% with it
    assert abs(int8["loss"] - full["loss"]) < 0.01 * full["loss"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quantize"] == "int8"


def test_generate_script_hugging_face_checkpoint_with_its_tokenizer(tmp_path, capsys):
    """A Hugging Face directory: prompts get the tokenizer's own special tokens, eos comes from the config."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<s>", "</s>", "hello", "world", "def", "x"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="x"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.add_special_tokens(["<s>", "</s>"])
    config = ModelConfig.from_name(
        "tiny-dense", n_layers=1, dim=32, n_heads=2, ffn_dim=64, vocab_size=len(words), max_seq_len=64
    )
    build_model(config).save_pretrained(tmp_path / "hf", format="hf")
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": 1}))

    loaded = load_tokenizer(tmp_path / "hf")
    assert loaded.encode_prompt("hello world") == [0, 2, 3] and loaded.eos_id == 1
    texts = script("generate").main(
        [
            "--model",
            str(tmp_path / "hf"),
            "--prompt",
            "hello",
            "--num-samples",
            "1",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0",
        ]
    )
    # the prompt, then the decoded new tokens (WordLevel joins them with spaces, none after the prompt); special
    # tokens are not printed
    assert len(texts) == 1 and texts[0].startswith("hello")
    assert set(texts[0].removeprefix("hello").split()) <= set(words[2:])
    assert "steps x 1 rows: first token after" in capsys.readouterr().out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
