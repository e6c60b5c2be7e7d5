"""Incremental detokenization and stop strings against whole-text references: the decode of all ids at once, and
str.find over the whole text."""

from __future__ import annotations

import random

import pytest

from moeformer.serving.text import REPLACEMENT, CompletionText, IncrementalDetokenizer, StopMatcher
from moeformer.training.tokenizer import BPETokenizer, ByteTokenizer

TEXTS = ["plain ascii words", "naïve café – 東京 🙂🚀 ok", "tabs\tand\nnewlines  ", "ü" * 7, "🙂"]


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    """`ids` cut at random places (pieces of 1 to 3 ids), as an engine's steps hand them out."""
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out.append(ids[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_byte_pieces_join_to_the_decode_and_never_show_a_broken_character(text):
    tokenizer, rng = ByteTokenizer(), random.Random(0)
    prompt = tokenizer.encode_prompt("x")
    for _ in range(5):
        detok = IncrementalDetokenizer(tokenizer, prompt)
        pieces = [detok.push(chunk) for chunk in _chunks(tokenizer.encode(text), rng)]
        assert "".join(pieces) + detok.flush() == text
        assert not any(REPLACEMENT in piece for piece in pieces)


def test_bpe_pieces_join_to_the_decode_of_prompt_and_completion():
    corpus = [t * 20 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog " * 30]
    tokenizer, rng = BPETokenizer.train(corpus, vocab_size=400, min_frequency=2), random.Random(1)
    for text in TEXTS + ["the lazy dog jumps"]:
        prompt, completion = tokenizer.encode_prompt("the quick"), tokenizer.encode(" " + text)
        detok = IncrementalDetokenizer(tokenizer, prompt)
        joined = "".join(detok.push(chunk) for chunk in _chunks(completion, rng)) + detok.flush()
        assert joined == tokenizer.decode(completion) == " " + text


def test_a_token_whose_text_depends_on_its_left_neighbour_is_decoded_after_the_prompt():
    """SentencePiece-style vocabularies drop the word marker's space at the start of a decode only: the completion's
    first word gets its space because the prompt's last ids are decoded with it."""
    from tokenizers import Tokenizer, decoders, models

    words = ["<unk>", "▁hello", "▁world", "▁again"]
    hf = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf.decoder = decoders.Metaspace()

    class Words:
        vocab_size = len(words)

        def decode(self, ids):
            return hf.decode(list(ids))

    detok = IncrementalDetokenizer(Words(), [1])
    assert detok.push([2]) + detok.push([3]) + detok.flush() == " world again"
    assert hf.decode([1, 2, 3])[len(hf.decode([1])) :] == " world again"


def test_ids_outside_the_tokenizer_are_dropped():
    tokenizer = ByteTokenizer()
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.eos_id])
    assert detok.push([ord("a"), 300, tokenizer.eos_id, ord("b")]) + detok.flush() == "ab"


def test_stop_matcher_cuts_at_the_first_completed_stop_string_however_the_text_is_split():
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 24)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        matcher, shown = StopMatcher(stops), []
        i = 0
        while i < len(text) and not matcher.stopped:
            n = rng.randint(1, 4)
            shown.append(matcher.push(text[i : i + n]))
            i += n
        hits = [(k + len(s), k) for s, k in ((s, text.find(s)) for s in stops) if k >= 0]
        expected = text[: min(hits)[1]] if hits else text  # the stop string that completes first
        assert matcher.stopped == bool(hits)
        assert "".join(shown) + matcher.flush() == expected
        if hits:
            assert matcher.push("more") == ""  # nothing after a stop


def test_stop_matcher_holds_back_only_a_possible_start_of_a_stop_string():
    matcher = StopMatcher(["STOP", "\n\n"])
    assert matcher.push("hello ST") == "hello "
    assert matcher.push("ART\n") == "START"
    assert matcher.push("x") == "\nx"
    assert matcher.push("y\n\nz") == "y" and matcher.stopped
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(["ok", ""])


def test_completion_text_stops_inside_a_multibyte_character_sequence():
    tokenizer = ByteTokenizer()
    text = CompletionText(tokenizer, tokenizer.encode_prompt("q"), stops=["東京"])
    shown = "".join(text.push([b]) for b in tokenizer.encode("café 東京 tower"))
    assert text.stopped and shown == "café "
    free = CompletionText(tokenizer, tokenizer.encode_prompt("q"), stops=["🙂x"])
    shown = "".join(free.push([b]) for b in tokenizer.encode("ok 🙂"))
    assert not free.stopped and shown == "ok " and free.finish() == "🙂"
