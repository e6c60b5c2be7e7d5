"""`Engine`: continuous batching over a paged KV cache. Requests join and leave the running batch at every step; a
step decodes one token for every running request (one forward, padded to a few fixed batch sizes when compiled) and
runs chunks of waiting prompts (one forward of at most `prefill_chunk` tokens), so a long prompt never stalls the
decodes. Full prompt blocks are shared across requests through the prefix cache. When compiled, prompt chunks ride in
the decode step itself, in the rows its largest size leaves beside the decodes, one row per prompt token (each row's
length ends at its token: a step writes every row's keys before any row attends, so the rows of one chunk see each
other causally), a long prompt over several steps: a short prompt, or the rest of one behind a prefix-cache hit,
costs one replayed step rather than an eager forward, and no decode waits for a prompt.

    engine = Engine(model, max_batch=64, eos_token_id=tokenizer_eos)
    engine.add_request("a", prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1))
    while engine.has_unfinished():
        for out in engine.step():
            ...  # out.request_id, out.new_token_ids, out.finished, out.finish_reason

Multi-rank (tensor / expert parallel models, `moeformer.parallel` applied as for training): every rank builds the
same Engine with `group` (all ranks of the model); rank 0 takes requests and calls `step`, which first sends that
step's new requests and aborts to the other ranks, then, after sampling, rank 0's tokens; ranks != 0 call
`follow()`, which steps with rank 0 until rank 0 calls `close()`. So every rank runs the same forwards.

    model, _ = parallelize(model, ParallelConfig(tp=2))        # under torchrun, as for training
    engine = Engine(model, group=dist.new_group(backend="gloo"))  # the plan is a Python object: a CPU group suits it
    if dist.get_rank() == 0:
        ...              # add_request / step as above
        engine.close()   # releases the other ranks
    else:
        engine.follow()

Between steps the other ranks wait inside a collective: an idle server should still call `step()` (an empty step)
more often than the group's timeout.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeformer.layers import triton_dispatch
from moeformer.layers.attention.paged import kernel_fits
from moeformer.layers.mla import MLAttention
from moeformer.models.generation import _compile_settings, _compiled_layers, capture_graph, sample_next
from moeformer.serving.paged_cache import BlockPool, PagedBatch, layer_pool
from moeformer.serving.request import Request, SamplingParams, StepOutput, sample_rows
from moeformer.serving.scheduler import Scheduler

CPU_CACHE_BUDGET = 1 << 30  # default KV cache bytes on the CPU (at most what max_batch full requests need)
GPU_CACHE_FRACTION = 0.5  # default share of the free GPU memory the KV cache takes
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # padded batch sizes of the compiled decode step


@dataclass
class _Plan:
    """What rank 0 sends the other ranks before a step."""

    adds: list[tuple[str, list[int], SamplingParams]] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    stop: bool = False


class Engine:
    """Serve `model` (a CausalLM with softmax or MLA attention, in eval mode on its device) to many requests at once.

    max_batch: running requests at most. block_size: tokens per cache block. num_blocks: cache blocks (default: from
    `cache_memory` bytes, itself by default half the free GPU memory, or on the CPU up to CPU_CACHE_BUDGET);
    enough for one request of max_model_len tokens is required. max_model_len: prompt + max_tokens limit (default
    and at most the model's max_seq_len). prefill_chunk: tokens of a step's prompt-chunk forward (rows x longest
    chunk). prefix_caching: share full prompt blocks. compile: the decode step's blocks compiled at each padded batch
    size (BATCH_SIZES; and view width, without the paged kernel), captured as a CUDA graph on CUDA (`warmup` does it
    before traffic). step_tokens: rows of its largest size (default 4 x max_batch), the decodes first: prompt chunks
    ride in the room left, one row per token, a chunk too long for it in part while decodes run (the rest in later
    steps, so no decode waits for a prompt); the engine's other prompt chunks (with no decode running, or
    compile=False) run eagerly (their rows, lengths and views vary without end: compiled, each new shape would
    recompile until dynamo's limit); compile=False runs everything eagerly (the reference).
    eos_token_id: stops every request. group: the process group of a multi-rank model (see the module docstring).
    Linear-attention layers keep a recurrent state, which has no pages: such models are refused.

    `stats()` reports blocks, prefix-cache hits, preemptions and the tokens prefilled."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 64,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_model_len: int | None = None,
        prefill_chunk: int = 512,
        step_tokens: int | None = None,
        prefix_caching: bool = True,
        compile: bool = False,
        eos_token_id: int | None = None,
        cache_memory: int | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        config = model.config
        step_tokens = 4 * max_batch if step_tokens is None else step_tokens
        for name, value in (
            ("max_batch", max_batch),
            ("block_size", block_size),
            ("prefill_chunk", prefill_chunk),
            ("step_tokens", step_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if step_tokens < max_batch:
            raise ValueError(f"step_tokens ({step_tokens}) must be at least max_batch ({max_batch}): every decode")
        max_model_len = config.max_seq_len if max_model_len is None else max_model_len
        if not 1 <= max_model_len <= config.max_seq_len:
            raise ValueError(f"max_model_len must be in [1, max_seq_len={config.max_seq_len}], got {max_model_len}")
        if eos_token_id is not None and not 0 <= eos_token_id < config.vocab_size:
            raise ValueError(f"eos_token_id must be in [0, vocab_size={config.vocab_size}), got {eos_token_id}")
        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        self.max_batch, self.block_size, self.max_model_len = max_batch, block_size, max_model_len
        self.eos_token_id, self.vocab_size = eos_token_id, config.vocab_size
        self.compile = compile
        per_token = sum(layer_pool(b.attn, 1, self.dtype, "meta").bytes_per_slot for b in model.layers)
        blocks_per_request = -(-max_model_len // block_size)
        if num_blocks is None:
            num_blocks = self._default_blocks(cache_memory, per_token, blocks_per_request)
        if num_blocks - 1 < blocks_per_request:  # one block is the null block
            raise ValueError(
                f"num_blocks={num_blocks} cannot hold one request of max_model_len={max_model_len} "
                f"tokens ({blocks_per_request} blocks of {block_size} + 1)"
            )
        self.num_blocks = num_blocks
        self.pools = [layer_pool(b.attn, num_blocks * block_size, self.dtype, self.device) for b in model.layers]
        self.block_pool = BlockPool(num_blocks, prefix_caching)
        self.scheduler = Scheduler(self.block_pool, block_size, max_batch, prefill_chunk)
        self.requests: dict[str, Request] = {}
        self._aborts: list[str] = []
        self._plan = _Plan()
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.prefilled_tokens = 0  # tokens run through prefill forwards (a prefix-cache hit skips its share)
        self.stepped_prefill_tokens = 0  # ... of which inside the compiled decode step
        step_rows = next((s for s in BATCH_SIZES if s >= step_tokens), step_tokens)  # the largest padded size
        self._step_sizes = [s for s in BATCH_SIZES if s < step_rows] + [step_rows]
        self.steps = 0
        self._ids = itertools.count()
        # the decode step's blocks are whole graphs at fixed shapes (each padded batch size a CUDA graph)
        self._step_layers = _compiled_layers(model, fullgraph=True) if compile else None
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._graph_pool = None
        # decode attention reads the pools in place (paged kernel): its view width changes nothing, so one width
        # serves every step; without the kernel the gathered view's width is bucketed (powers of two blocks)
        self._max_blocks = blocks_per_request
        self._in_place = triton_dispatch.runs_triton(param) and all(
            _kernel_serves(b.attn, block_size) for b in model.layers
        )

    def _default_blocks(self, cache_memory: int | None, per_token: int, blocks_per_request: int) -> int:
        per_block = per_token * self.block_size
        if cache_memory is None:
            if self.device.type == "cuda":
                cache_memory = int(torch.cuda.mem_get_info(self.device)[0] * GPU_CACHE_FRACTION)
            else:
                cache_memory = min(CPU_CACHE_BUDGET, self.max_batch * blocks_per_request * per_block)
        return max(cache_memory // per_block, blocks_per_request) + 1

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        """Queue a request; ValueError for a duplicate id, an empty prompt, ids outside the vocabulary or a prompt
        that leaves no room for max_tokens within max_model_len."""
        self._check_leader("add_request")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: a request needs at least one prompt token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise ValueError("prompt_ids must be ints")
        low, high = min(prompt_ids), max(prompt_ids)
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"prompt_ids must be in [0, vocab_size={self.vocab_size}), got ids from {low} to {high}")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context of {self.max_model_len} tokens"
            )
        self._add(request_id, prompt_ids, params)
        if self.group is not None:
            self._plan.adds.append((request_id, prompt_ids, params))

    def _add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        stop = set(params.stop_token_ids) | ({self.eos_token_id} if self.eos_token_id is not None else set())
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        request = Request(request_id, len(prompt_ids), list(prompt_ids), params, frozenset(stop), generator)
        self.requests[request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; the next step reports it finished with reason "abort". Unknown or
        already finished ids are ignored (a client may go away after its request ended)."""
        self._check_leader("abort")
        if request_id in self.requests and request_id not in self._aborts:
            self._aborts.append(request_id)
            if self.group is not None:
                self._plan.aborts.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- stepping ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """One scheduler iteration: admit waiting requests, prefill up to prefill_chunk prompt tokens, decode one
        token for every running request; return what each scheduled (or aborted) request produced."""
        self._check_leader("step")
        if self.group is not None:
            self._broadcast(self._plan)
            self._plan = _Plan()
        return self._step()

    def _step(self) -> list[StepOutput]:
        self.steps += 1
        outputs = []
        for request_id in self._aborts:
            request = self.requests.pop(request_id)
            self.scheduler.remove(request)
            outputs.append(StepOutput(request_id, [], True, "abort"))
        self._aborts = []
        plan = self.scheduler.schedule()
        stepped, eager = self._split(plan.prefill, len(plan.decode))
        sampled, logits = [], []
        if eager:
            rows = self._forward([request for request, _ in eager], [n for _, n in eager])
            for i, (request, n) in enumerate(eager):
                self._prefilled(request, n, rows[i : i + 1], sampled, logits)
        if stepped or plan.decode:
            rows = self._decode([(r, j) for r, n in stepped for j in range(n)] + [(r, 0) for r in plan.decode])
            end = 0
            for request, n in stepped:
                end += n
                self.stepped_prefill_tokens += n
                self._prefilled(request, n, rows[end - 1 : end], sampled, logits)
            logits.append(rows[end:])
            for request in plan.decode:
                self.scheduler.computed(request, 1)
            sampled.extend(plan.decode)
        if sampled:
            tokens = self._sample(torch.cat(logits), sampled)
            for request, token in zip(sampled, tokens):
                request.append(token)
        for request in [r for r, _ in plan.prefill] + plan.decode:
            if request.finish_reason is not None:
                self.scheduler.remove(request)
                del self.requests[request.id]
            outputs.append(
                StepOutput(request.id, request.new_tokens, request.finish_reason is not None, request.finish_reason)
            )
            request.new_tokens = []
        return outputs

    def _split(self, chunks: list[tuple[Request, int]], decodes: int) -> tuple[list, list]:
        """The prompt chunks that ride in the compiled decode step, in order, in the rows its largest padded size
        leaves beside the `decodes`: whole, or while decodes run, in part (the rest in later steps: an eager prompt
        forward would stall them); and those left to the eager prompt forward."""
        if not self.compile:
            return [], chunks
        room, stepped, eager = self._step_sizes[-1] - decodes, [], []
        for request, n in chunks:
            if n <= room or (decodes and room):
                stepped.append((request, min(n, room)))
                room -= min(n, room)
            elif not decodes:
                eager.append((request, n))
        return stepped, eager

    def _prefilled(self, request: Request, n: int, row: torch.Tensor, sampled: list, logits: list) -> None:
        """Book a computed prompt chunk; once its prompt is complete, `row` holds its next token's logits."""
        self.prefilled_tokens += n
        self.scheduler.computed(request, n)
        if request.uncomputed == 0:
            sampled.append(request)
            logits.append(row)

    def _forward(self, rows: list[Request], counts: list[int]) -> torch.Tensor:
        """Eager forward of the next counts[b] uncomputed tokens of each row; logits (B, V) of the token after them."""
        seq = max(counts)
        ids = torch.tensor(
            [[0] * (seq - n) + r.tokens[r.computed : r.computed + n] for r, n in zip(rows, counts)], device=self.device
        )
        lengths = [r.computed + n for r, n in zip(rows, counts)]
        width = -(-max(length + seq - n for length, n in zip(lengths, counts)) // self.block_size)
        new = None if min(counts) == seq else self._tensor(counts)
        batch = PagedBatch(
            self.pools,
            self.block_size,
            self._tables(rows, width),
            self._tensor(lengths),
            seq,
            width * self.block_size,
            new,
        )
        out = self.model(ids, cache=batch, stats=False, logits_to_keep=1)
        return out.logits[:, -1]

    def _decode(self, rows: list[tuple[Request, int]]) -> torch.Tensor:
        """Logits (B, V) after each row's token: (request, j) is the request's uncomputed token j (0 for a decode)."""
        if not self.compile:
            return self._forward([r for r, _ in rows], [1] * len(rows))
        size = next(s for s in self._step_sizes if s >= len(rows))
        needed = -(-max(r.computed + j + 1 for r, j in rows) // self.block_size)
        width = self._max_blocks if self._in_place else min(1 << (needed - 1).bit_length(), self._max_blocks)
        return self._graph(size, width)(rows)[: len(rows)]

    def _graph(self, size: int, width: int) -> _DecodeGraph:
        graph = self._graphs.get((size, width))
        if graph is None:
            graph = self._graphs[size, width] = _DecodeGraph(self, size, width)
        return graph

    @torch.no_grad()
    def warmup(self) -> None:
        """Compile and capture ahead of traffic (compile=True): the decode step at every padded batch size up to
        max_batch (at every view width too, without the paged kernel)."""
        if not self.compile:
            return
        widths = (
            [self._max_blocks]
            if self._in_place
            else sorted({min(1 << i, self._max_blocks) for i in range(self._max_blocks.bit_length() + 1)})
        )
        for size in self._step_sizes:
            for width in widths:
                graph = self._graph(size, width)
                if graph.graph is None:
                    graph([])  # compiles (on CUDA the graph was captured on creation)
        self.generate([[0] * 5, [0] * 37], SamplingParams(max_tokens=2))
        self.generate([[1] * 19], SamplingParams(max_tokens=2))

    def _tables(self, rows: list[Request], width: int) -> torch.Tensor:
        return self._tensor([r.blocks[:width] + [0] * (width - len(r.blocks[:width])) for r in rows])

    def _tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long).to(self.device, non_blocking=True)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """One token per row: argmax for greedy requests; seeded ones each from its own generator (`sample_next`,
        as `generate` draws); the other sampled rows together (`sample_rows`). On a multi-rank engine every rank
        takes rank 0's tokens."""
        tokens = logits.argmax(dim=-1)
        unseeded = []
        for i, request in enumerate(requests):
            p = request.params
            if p.greedy:
                continue
            if request.generator is None:
                unseeded.append(i)
                continue
            tokens[i] = sample_next(
                logits[i : i + 1], p.temperature, p.top_k or None, p.top_p if p.top_p < 1 else None, request.generator
            )[0]
        if unseeded:
            params = [requests[i].params for i in unseeded]
            options = torch.tensor([[p.temperature, p.top_k, p.top_p] for p in params], dtype=torch.float64)
            temperature, top_k, top_p = options.to(self.device).unbind(1)
            rows = torch.tensor(unseeded, device=self.device)
            tokens[rows] = sample_rows(logits[rows], temperature.float(), top_k.long(), top_p.float())
        tokens = tokens.tolist()
        if self.group is not None:
            tokens = self._broadcast(tokens)
        return tokens

    # ---- running to completion, statistics ----------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[list[int]]:
        """Run `prompts` to completion; their output tokens, in order. Requests queued by `add_request` run along,
        but their step outputs are consumed here: use `step` to follow them."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, params):
            self.add_request(request_id, prompt, p)
        outputs = {request_id: [] for request_id in ids}
        while any(request_id in self.requests for request_id in ids):
            for out in self.step():
                if out.request_id in outputs:
                    outputs[out.request_id].extend(out.new_token_ids)
        return [outputs[request_id] for request_id in ids]

    def stats(self) -> dict[str, int]:
        """Cache and scheduler counters: free/total blocks, prefix-cache hit blocks, preemptions, prefilled tokens
        (and how many of them rode in the compiled decode step), running and waiting requests, steps."""
        return dict(
            free_blocks=self.block_pool.num_free,
            total_blocks=self.block_pool.num_usable,
            prefix_hit_blocks=self.block_pool.hit_blocks,
            preemptions=self.scheduler.preemptions,
            prefilled_tokens=self.prefilled_tokens,
            stepped_prefill_tokens=self.stepped_prefill_tokens,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            steps=self.steps,
        )

    # ---- several ranks -------------------------------------------------------------------------
    def follow(self) -> None:
        """On ranks != 0 of a multi-rank engine: step with rank 0 until it calls `close`."""
        if self.group is None or self.rank == 0:
            raise RuntimeError("follow() is for ranks != 0 of an Engine built with a process group")
        with torch.no_grad():
            while True:
                plan = self._broadcast(None)
                if plan.stop:
                    self.close()
                    return
                for request_id, prompt, params in plan.adds:
                    self._add(request_id, prompt, params)
                self._aborts.extend(plan.aborts)
                self._step()

    def close(self) -> None:
        """Done serving: on rank 0 of a multi-rank engine, release the other ranks from `follow` (they close too);
        on every rank, drop the captured decode steps: a CUDA graph that captured a collective (tensor / expert
        parallel model) holds its NCCL communicator, and leaving the process group would wait for it forever."""
        if self.group is not None and self.rank == 0:
            self._broadcast(_Plan(stop=True))
        self._graphs.clear()

    def _broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def _check_leader(self, what: str) -> None:
        if self.rank != 0:
            raise RuntimeError(f"{what}() is rank 0's: rank {self.rank} of a multi-rank engine calls follow()")


def _kernel_serves(attn, block_size: int) -> bool:
    """Whether the paged decode kernel serves `attn`'s decode steps (else they gather the view)."""
    if attn.backend == "eager":
        return False
    if isinstance(attn, MLAttention):
        width = attn.kv_lora_rank + attn.rope_dim
        return attn.absorbs(1) and kernel_fits(attn.n_heads, width, width, block_size)
    return kernel_fits(attn.n_heads // attn.n_kv_heads, attn.head_dim, attn.head_dim, block_size)


class _DecodeGraph:
    """The compiled decode step at `size` rows and a view of `width` blocks: fixed input buffers, the compiled blocks
    and, on CUDA, one CUDA graph replaying the whole step (rows past the real ones are padding: the null block, no
    expert load)."""

    def __init__(self, engine: Engine, size: int, width: int) -> None:
        self.engine, self.size, self.width = engine, size, width
        device = engine.device
        self.ids = torch.zeros(size, 1, dtype=torch.long, device=device)
        self.tables = torch.zeros(size, width, dtype=torch.long, device=device)
        self.lengths = torch.ones(size, dtype=torch.long, device=device)
        self.rows = torch.zeros(size, dtype=torch.bool, device=device)
        self.graph = None
        if device.type == "cuda":
            self._capture()

    def _run(self) -> torch.Tensor:
        engine = self.engine
        view = None if engine._in_place else self.width * engine.block_size
        batch = PagedBatch(engine.pools, engine.block_size, self.tables, self.lengths, 1, view, rows=self.rows)
        with _compile_settings():
            return engine.model(self.ids, cache=batch, stats=False, layers=engine._step_layers).logits[:, -1]

    def _capture(self) -> None:
        if self.engine._graph_pool is None:
            self.engine._graph_pool = torch.cuda.graph_pool_handle()
        self.graph, self.logits = capture_graph(self._run, self.engine._graph_pool)

    def __call__(self, rows: list[tuple[Request, int]]) -> torch.Tensor:
        n, engine = len(rows), self.engine
        self.ids.zero_()
        self.tables.zero_()
        self.lengths.fill_(1)
        self.rows.zero_()
        if n:
            self.ids[:n, 0] = engine._tensor([r.tokens[r.computed + j] for r, j in rows])
            used = min(self.width, max(len(r.blocks) for r, _ in rows))  # the rest stays the null block
            # a prompt chunk's rows are consecutive and share its request's table: one table row per request
            requests, repeats = zip(*((r, len(list(g))) for r, g in itertools.groupby(r for r, _ in rows)))
            tables = engine._tables(list(requests), used)
            self.tables[:n, :used] = tables.repeat_interleave(engine._tensor(repeats), dim=0, output_size=n)
            self.lengths[:n] = engine._tensor([r.computed + j + 1 for r, j in rows])
            self.rows[:n] = True
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits
