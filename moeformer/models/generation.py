"""Autoregressive generation: sampling (greedy, temperature, top-k, top-p); the eager reference, a host-side cache
grown token by token; and `Decoder`, the static-cache prefill and decode step, compiled, the step replayed as one
CUDA graph. `generate` drives either with the same loop, so both give the same tokens."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F

SYNC_EVERY = 16  # default steps between the loop's host reads of whether every row has finished
CACHE_BUCKET = 256  # static caches are sized in multiples of this, so prompts of similar length share a decoder
MIN_PREFILL = 16  # the shortest compiled prefill (prompts are left-padded to a power of two at least this long)
RECOMPILE_LIMIT = 64  # graphs dynamo may keep for the compiled prefill or step (buckets x cache shapes)
MAX_DECODERS = 2  # decoders kept per model (each holds a cache and a compiled step), least recently used dropped


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError unless `input_ids` are integers in [0, vocab_size) (reads them on the host: a sync on an
    accelerator)."""
    dtype = input_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"token ids must be an integer tensor, got {dtype}")
    if input_ids.numel():
        low, high = torch.stack(input_ids.aminmax()).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}), got ids from {low} to {high}")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for sampling options outside their range."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V); temperature 0 is greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StepTimer:
    """A `stream` callback that times generation without waiting for the device: a mark at its creation and at each
    streamed step, CUDA events on a GPU (recorded in stream order), wall-clock times on the CPU."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []
        self.start = self._mark()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __call__(self, tokens: torch.Tensor | None = None) -> None:
        self.marks.append(self._mark())

    @property
    def steps(self) -> int:
        return len(self.marks)

    def seconds(self) -> tuple[float, float]:
        """(from creation to the first step, from the first step to the last); waits for the device."""
        if not self.marks:
            raise RuntimeError("StepTimer saw no step")
        if not self.cuda:
            return self.marks[0] - self.start, self.marks[-1] - self.marks[0]
        torch.cuda.synchronize()
        return self.start.elapsed_time(self.marks[0]) / 1e3, self.marks[0].elapsed_time(self.marks[-1]) / 1e3


class EagerDecoder:
    """The reference decoder: a host-side cache filled left to right and the padding mask grown by one column per
    step; eager PyTorch throughout."""

    def __init__(self, model, batch: int, max_len: int) -> None:
        self.model, self.cache = model, model.new_cache(batch, max_len)
        self.mask: torch.Tensor | None = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (B, T); the logits (B, V) of the token after it."""
        self.mask = attention_mask
        out = self.model(input_ids, attention_mask=attention_mask, cache=self.cache, stats=False, logits_to_keep=1)
        return out.logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); the logits (B, V) of the next."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.model(token[:, None], attention_mask=self.mask, cache=self.cache, stats=False).logits[:, -1]


class Decoder:
    """Prefill and decode step of `model` over a `StaticCache` of `batch` rows and `max_len` slots (padded prompt +
    new tokens).

    compile=True compiles both with torch.compile at fixed shapes, block by block (one graph per block kind and
    shape, reused by every layer: compiling a deep model takes about as long as one block), the step's blocks with
    fullgraph=True; the few operations around the blocks (embedding, rope, norm, head) stay eager, which costs
    nothing once the step is captured. The prefill is bucketed: the prompt is left-padded (masked, so the logits are
    those of the unpadded prompt) to the next power of two of at least MIN_PREFILL, one graph per bucket, so a few
    graphs cover every prompt length at most twice the prompt's compute. The step reads its position from the cache
    on the device, so it never recompiles. cuda_graph (default: compiled on CUDA) captures that step once as a CUDA
    graph and replays it per token: `step` then copies the token into the graph's input buffer and returns its output
    buffer, which the next step overwrites.
    """

    def __init__(
        self, model, batch: int, max_len: int, *, compile: bool = True, cuda_graph: bool | None = None
    ) -> None:
        device = next(model.parameters()).device
        self.cuda_graph = compile and device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on CUDA, got one on {device}")
        self.model, self.compiled = model, compile
        self.cache = model.new_cache(batch, max_len, static=True)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the step's input buffer
        # the step's blocks must be whole graphs (they are captured); the prefill's may break (e.g. around fla's
        # kernels on CUDA)
        self._prefill_layers = _compiled_layers(model, fullgraph=False) if compile else None
        self._step_layers = _compiled_layers(model, fullgraph=True) if compile else None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None  # the graph's output buffer

    @property
    def batch(self) -> int:
        return self.cache.batch

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Empty the cache and run the prompt (B, T), left-padded where `attention_mask` (B, T) is 0 (and, compiled,
        further to its bucket); return the logits (B, V) of the token after it."""
        if self.cuda_graph and self._graph is None:
            self._capture()
        self.cache.reset()
        length = input_ids.shape[1]
        padded = min(prefill_bucket(length), self.max_len) if self.compiled else length
        if padded > length:
            real = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            input_ids = F.pad(input_ids, (padded - length, 0))
            attention_mask = F.pad(real.bool(), (padded - length, 0))
        with _compile_settings():
            return self._prefill_logits(input_ids, attention_mask)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) at the next position; return the logits (B, V) of the token after it."""
        if not self.cache.prefilled:
            raise RuntimeError("Decoder.step needs a prompt first: call prefill")
        self.token.copy_(token.view(-1, 1))
        if self._graph is not None:
            self._graph.replay()
            return self._logits
        return self._step_logits()

    def _prefill_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            cache=self.cache,
            stats=False,
            logits_to_keep=1,
            layers=self._prefill_layers,
        )
        return out.logits[:, -1]

    def _step_logits(self) -> torch.Tensor:
        with _compile_settings():
            return self.model(self.token, cache=self.cache, stats=False, layers=self._step_layers).logits[:, -1]

    def _capture(self) -> None:
        """Compile and warm the step on a side stream (on a throwaway state), capture one replay of it, then leave
        the cache empty: capturing records kernels without running them."""
        self.cache.reset()
        self.cache.prefilled = True  # the step's code path: a prompt is in
        self._graph, self._logits = capture_graph(self._step_logits)
        self.cache.reset()


def capture_graph(fn: Callable[[], torch.Tensor], pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run `fn` twice on a side stream (compiling and warming it), then capture one call as a CUDA graph, in the
    memory `pool` if given (graphs replayed one at a time may share one); the graph and its output buffer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def prefill_bucket(length: int) -> int:
    """The padded length a compiled prefill runs a `length`-token prompt at: the next power of two, >= MIN_PREFILL."""
    return max(MIN_PREFILL, 1 << (length - 1).bit_length())


def _compiled_layers(model, fullgraph: bool, dynamic: bool | None = False) -> list:
    """torch.compile of each of `model`'s blocks, at fixed shapes unless `dynamic` (wrappers: the model itself is
    left as it is). Every block of one kind runs the same compiled code, so the model compiles about as fast as one
    block."""
    return [torch.compile(block, fullgraph=fullgraph, dynamic=dynamic) for block in model.layers]


def _compile_settings():
    """Dynamo settings of the compiled blocks: scalar outputs captured, since the reference expert loop (CPU, fp32)
    reads its group sizes as scalars, and room for one graph per block kind, prefill bucket and cache shape (every
    decoder's graphs are entries of the same code)."""
    return torch._dynamo.config.patch(capture_scalar_outputs=True, recompile_limit=RECOMPILE_LIMIT)


def cached_decoder(model, batch: int, prompt_len: int, max_new_tokens: int) -> Decoder:
    """A compiled `Decoder` of `model` for `batch` rows, reused across calls: its cache holds the prompt's prefill
    bucket plus the new tokens, rounded up to a multiple of CACHE_BUCKET (a slot is not a position: padding takes
    slots, so this may exceed max_seq_len while no position does); the MAX_DECODERS most recently used are kept per
    model, and one is rebuilt when the model's parameters moved (a CUDA graph reads them at fixed addresses)."""
    length = -(-(prefill_bucket(prompt_len) + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    params = next(model.parameters())
    key = (batch, length, params.dtype, params.device)
    addresses = tuple(p.data_ptr() for p in model.parameters())
    decoders = model.__dict__.setdefault("_decoders", OrderedDict())
    entry = decoders.pop(key, None)
    if entry is None or entry[0] != addresses:
        entry = (addresses, Decoder(model, batch, length))
    decoders[key] = entry
    while len(decoders) > MAX_DECODERS:
        decoders.popitem(last=False)
    return entry[1]


def check_prompt(
    model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Validate a generation request (reading the ids and the mask on the host, once per call); return the mask as
    bool."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(
            f"input_ids must be a (batch, prompt_len) tensor with at least one token per row, got {shape}"
            " (a single prompt needs a batch dimension: ids[None])"
        )
    check_token_ids(input_ids, model.config.vocab_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    batch, prompt_len = input_ids.shape
    model.check_length(prompt_len + max_new_tokens, f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens})")
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (batch, prompt_len):
        raise ValueError(
            f"attention_mask must have the prompt's shape {(batch, prompt_len)}, got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(input_ids.device).bool()
    not_left, empty_row = torch.stack([(mask[:, 1:] < mask[:, :-1]).any(), (~mask.any(dim=1)).any()]).tolist()
    if not_left:
        raise ValueError("attention_mask must be left padding: in every row zeros (padding) before ones (tokens)")
    if empty_row:
        raise ValueError("attention_mask has a row without any real token")
    return mask


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    stream: Callable[[torch.Tensor], None] | None = None,
    sync_every: int = SYNC_EVERY,
) -> torch.Tensor:
    """Return `input_ids` followed by up to `max_new_tokens` sampled tokens (B, T + n); also `CausalLM.generate`.

    Prompts of different lengths are left-padded with `attention_mask` (1 = real token). A row that emitted `eos`
    is filled with `eos` afterwards; generation stops once every row has finished, n being the step at which the
    last row did. compile=False decodes eagerly over a host-side cache (the reference); compile=True uses a cached
    compiled `Decoder` (a CUDA graph per token on CUDA), same tokens.

    `stream(tokens)` is called once per step with that step's tokens, (B,) on the model's device, as soon as they are
    queued: reading them on the host is the caller's choice (and sync). The loop itself waits for the device only
    every `sync_every` steps, to see whether every row has finished; so after the last row's eos up to
    sync_every - 1 further steps, eos in every row, may be streamed, which the returned tensor leaves out.
    """
    mask = check_prompt(model, input_ids, max_new_tokens, attention_mask)
    check_sampling(temperature, top_k, top_p)
    vocab = model.config.vocab_size
    if eos is not None and not (isinstance(eos, int) and 0 <= eos < vocab):
        raise ValueError(f"eos must be a token id in [0, {vocab}), got {eos!r}")
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    if max_new_tokens == 0:
        return input_ids
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if compile:
        decoder = cached_decoder(model, batch, prompt_len, max_new_tokens)
    else:
        decoder = EagerDecoder(model, batch, total)
    logits = decoder.prefill(input_ids, mask)

    out = input_ids.new_empty(batch, total)
    out[:, :prompt_len] = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    finished_at = torch.zeros(batch, dtype=torch.long, device=input_ids.device)  # step of each row's eos
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos is not None:
            token = token.masked_fill(finished, eos)
            hit = (token == eos) & ~finished
            finished_at.masked_fill_(hit, i)
            finished |= hit
        out[:, prompt_len + i] = token
        if stream is not None:
            stream(token)
        if i + 1 == max_new_tokens or (eos is not None and (i + 1) % sync_every == 0 and bool(finished.all())):
            break
        logits = decoder.step(token)
    if eos is not None and bool(finished.all()):
        return out[:, : prompt_len + int(finished_at.max()) + 1]
    return out[:, : prompt_len + i + 1]
