"""What a client asks for (`SamplingParams`), what a step hands back (`StepOutput`) and the engine's record of one
request in flight (`Request`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class SamplingParams:
    """How one request samples: temperature 0 is greedy; top_k 0 and top_p 1 are off. `seed` gives the request its
    own generator, so its tokens do not depend on which other requests share its batch (None: torch's global RNG,
    one draw for all such requests of a step). Generation stops after `max_tokens` tokens or at a token of
    `stop_token_ids` (or the engine's eos), which is kept as the last output token. Invalid values raise ValueError
    naming the field."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {self.seed!r}")
        try:
            self.stop_token_ids = tuple(self.stop_token_ids)
        except TypeError:
            raise ValueError(f"stop_token_ids must be a sequence of ints, got {self.stop_token_ids!r}") from None
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class StepOutput:
    """One request's share of a step: the tokens it produced (empty while its prompt is being prefilled, or when it
    was aborted) and whether it finished, and why ("stop": a stop token or eos, "length": max_tokens, "abort")."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


@dataclass(eq=False)
class Request:
    """A request in the engine. `tokens` is the prompt followed by the output so far; the first `computed` of them
    have their keys and values in the cache blocks `blocks` (a preempted request keeps its output and recomputes
    the cache); `hashes` are the prefix-cache keys of its full blocks so far."""

    id: str
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None = None
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    finish_reason: str | None = None
    new_tokens: list[int] = field(default_factory=list)  # produced in the current step

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def uncomputed(self) -> int:
        """Tokens still to run through the model: 1 while decoding, more while (re)filling the cache."""
        return len(self.tokens) - self.computed

    def append(self, token: int) -> None:
        """Record a sampled token and finish the request if it is a stop token or the last one allowed."""
        self.tokens.append(token)
        self.new_tokens.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) - self.prompt_len >= self.params.max_tokens:
            self.finish_reason = "length"


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """One token per row of `logits` (N, V), each row with its own temperature (> 0), top_k (0: off) and top_p
    (1: off), all (N,) tensors, in one draw from torch's global RNG: the distribution of `sample_next` per row
    (top-k, ties kept, then the smallest prefix of mass top_p), without a launch per row."""
    scaled = logits.float() / temperature[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=ordered.shape[-1]), ordered.shape[-1])
    ordered = ordered.masked_fill(ordered < ordered.gather(1, (k - 1)[:, None]), float("-inf"))
    probs = ordered.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None]
    choice = torch.multinomial(F.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1), 1)
    return order.gather(1, choice).squeeze(1)
