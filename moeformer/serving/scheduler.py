"""The scheduler: which requests run in a step and with which cache blocks. First come, first served: waiting
requests are admitted while batch slots and blocks allow (a prefix-cache hit takes its cached blocks instead of new
ones); each step decodes every running request holding one uncomputed token and runs chunks of the others' prompts,
oldest first, in one forward of at most `prefill_chunk` tokens (rows x the longest chunk); when a decode needs a
block and none is free, the newest running request is preempted (its blocks freed, its output kept, its cache
recomputed when it is admitted again), so the engine never deadlocks and never drops a request."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from moeformer.serving.paged_cache import BlockPool, block_hash
from moeformer.serving.request import Request

ROOT_KEY = b""  # parent key of a sequence's first block


@dataclass
class StepPlan:
    """One step's work: requests decoding one token each, and prompt chunks (request, number of tokens) run together."""

    decode: list[Request]
    prefill: list[tuple[Request, int]]


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_batch: int, prefill_chunk: int) -> None:
        self.pool, self.block_size, self.max_batch, self.prefill_chunk = pool, block_size, max_batch, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out (finished or aborted) and release its blocks."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.pool.release(request.blocks)
        request.blocks = []

    def schedule(self) -> StepPlan:
        self._admit()
        decode = [r for r in self.running if r.uncomputed == 1]
        for request in decode:
            if request in self.running:  # not preempted by an earlier request's growth
                self._grow(request, request.computed + 1)
        decode = [r for r in decode if r in self.running]
        prefill, width = [], 0  # prompt chunks share one forward of len(prefill) x width tokens at most prefill_chunk
        for request in self.running:
            if request.uncomputed > 1:
                rows = len(prefill) + 1
                if rows * width > self.prefill_chunk:
                    break
                n = min(request.uncomputed, self.prefill_chunk // rows)
                prefill.append((request, n))
                width = max(width, n)
        return StepPlan(decode, prefill)

    def computed(self, request: Request, n: int) -> None:
        """`n` more of the request's tokens are in the cache: register its newly full blocks in the prefix cache."""
        first = request.computed // self.block_size
        request.computed += n
        self._extend_keys(request, request.computed)
        for i in range(first, request.computed // self.block_size):
            self.pool.register(request.blocks[i], request.hashes[i])

    def _extend_keys(self, request: Request, length: int) -> None:
        """Prefix-cache keys of the request's full blocks within its first `length` tokens."""
        bs = self.block_size
        for i in range(len(request.hashes), length // bs):
            parent = request.hashes[i - 1] if i else ROOT_KEY
            request.hashes.append(block_hash(parent, request.tokens[i * bs : (i + 1) * bs]))

    def _admit(self) -> None:
        """FCFS admission while a batch slot is open and the request's uncomputed tokens fit the free blocks. The
        last token is always computed (its logits give the next token), so a hit covers at most the full blocks
        before it."""
        bs = self.block_size
        # blocks the running decodes take this step: admitting into them would only preempt the newcomer again
        reserve = sum(1 for r in self.running if r.uncomputed == 1 and len(r.blocks) * bs <= r.computed)
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting[0]
            self._extend_keys(request, len(request.tokens) - 1)
            hit = self.pool.match(request.hashes[: (len(request.tokens) - 1) // bs])
            needed = -(-len(request.tokens) // bs) - len(hit)
            held_hits = sum(1 for b in hit if self.pool.refs[b] > 0)  # hits outside the free count
            if needed + reserve > self.pool.num_free - (len(hit) - held_hits):
                break
            self.waiting.popleft()
            self.pool.take(hit)
            request.blocks = hit + [self.pool.allocate() for _ in range(needed)]
            request.computed = len(hit) * bs
            self.running.append(request)

    def _grow(self, request: Request, length: int) -> None:
        """Give `request` blocks for `length` tokens, preempting the newest running requests (possibly itself)
        while none is free."""
        while len(request.blocks) * self.block_size < length:
            if self.pool.num_free == 0:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    return
                continue
            request.blocks.append(self.pool.allocate())

    def _preempt(self, request: Request) -> None:
        """Back to the front of the queue, output kept, cache to be recomputed (its full blocks stay cached)."""
        self.running.remove(request)
        self.pool.release(request.blocks)
        request.blocks, request.computed = [], 0
        self.waiting.appendleft(request)
        self.preemptions += 1
