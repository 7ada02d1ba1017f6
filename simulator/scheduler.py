"""The simulated engine scheduler: continuous batching over a finite KV cache.

A reduced vLLM V1 scheduler, pure and synchronous (the async driver is
``simulator.engine``). One engine step is ``schedule()`` → (the step's modelled
duration elapses) → ``complete(plan)``:

* Every sequence tracks ``num_computed`` tokens against its length (prompt + tokens
  generated so far). A step gives each running sequence the tokens it still needs —
  the rest of its prompt (chunked by the ``max_num_batched_tokens`` budget) or one
  decode token — and when a sequence has computed its whole length the step samples
  one new token. So the first token appears at the end of the step that finishes the
  prefill, as in vLLM.
* Running sequences are served first, in admission order. If one needs a new KV block
  and none is free, the most recently admitted running sequence is preempted (blocks
  freed, progress dropped, put back at the head of the waiting queue, recomputed later:
  vLLM's recompute preemption) and counted in ``num_preemptions``.
* Waiting sequences are admitted strictly FIFO while there are free seats
  (``max_num_seqs``), budget and free blocks. On admission the prompt's leading blocks
  that are in the prefix cache are taken as already computed (at least one prompt
  token is always recomputed, as in vLLM); the prefix-cache counters count tokens.
* Step duration = prefill tokens x ``prefill_s_per_token`` + ``decode_base_s`` +
  ``decode_per_seq_s`` x sequences in the step. (The base cost is paid by any step.)

The clock is injected (``clock()`` → seconds, monotonic); it only timestamps arrivals,
admissions and tokens for the latency metrics, so tests drive it by hand.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque
from collections.abc import Callable, Sequence

from simulator import kv
from simulator.config import ProfileSettings
from synapse_common.clock import Clock


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Seq:
    """One sequence (one choice of one request) as the scheduler sees it."""

    request_id: str
    num_prompt_tokens: int
    block_hashes: Sequence[int]  # chained hashes of the prompt's full blocks
    output_len: int  # tokens to generate before finishing (decided up front)
    finish_reason: str = "length"  # reported when output_len is reached
    state: State = State.WAITING
    num_generated: int = 0
    num_computed: int = 0
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache (last admission)
    blocks: list[kv.BlockRef] = dataclasses.field(default_factory=list)
    num_registered: int = 0  # leading blocks already registered in the prefix cache
    arrival: float = 0.0
    admitted: float | None = None  # first admission
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    on_progress: Callable[[Seq], None] | None = None  # after each token, and at the end
    on_done: Callable[[Seq], None] | None = None  # at the end only (instead of on_progress)

    @property
    def length(self) -> int:
        return self.num_prompt_tokens + self.num_generated

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.length - 1 or self.num_generated == 0


@dataclasses.dataclass
class StepPlan:
    """What one step computes; ``duration`` is modelled seconds (before time scaling)."""

    scheduled: list[tuple[Seq, int]]
    prefill_tokens: int
    duration: float


@dataclasses.dataclass
class Counters:
    """Monotonic totals, exported as vLLM counters."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    prefill_computed: int = 0  # prompt (and recomputed) tokens actually prefilled
    steps: int = 0
    finished: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})


class Scheduler:
    def __init__(self, profile: ProfileSettings, clock: Clock) -> None:
        self.profile = profile
        self.clock = clock
        self.pool = kv.BlockPool(profile.num_gpu_blocks)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.counters = Counters()
        self.on_finish: Callable[[Seq], None] | None = None

    # -- queue management ---------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, seq: Seq) -> None:
        seq.arrival = self.clock()
        self.waiting.append(seq)

    def abort(self, seq: Seq) -> None:
        """Drop a sequence (client went away); no-op once finished."""
        if seq.state is State.FINISHED:
            return
        if seq.state is State.RUNNING:
            self.running.remove(seq)
            self.pool.release(seq.blocks)
            seq.blocks = []
        else:
            self.waiting.remove(seq)
        self._finish(seq, "abort")

    # -- one step -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Pick this step's work and reserve its KV blocks."""
        budget = self.profile.max_num_batched_tokens
        scheduled: list[tuple[Seq, int]] = []
        prefill = 0
        preempted = self.counters.preemptions
        budget, prefill = self._schedule_running(scheduled, budget, prefill)
        if self.counters.preemptions == preempted:
            # As in vLLM: a step that had to preempt admits nobody new.
            prefill = self._schedule_waiting(scheduled, budget, prefill)
        duration = 0.0
        self.counters.prefill_computed += prefill
        if scheduled:
            self.counters.steps += 1
            duration = (prefill * self.profile.prefill_s_per_token + self.profile.decode_base_s
                        + self.profile.decode_per_seq_s * len(scheduled))
        return StepPlan(scheduled, prefill, duration)

    def _schedule_running(self, scheduled: list[tuple[Seq, int]], budget: int,
                          prefill: int) -> tuple[int, int]:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.length - seq.num_computed, budget)
            if not self._grow(seq, n):
                # Nothing left to preempt but itself: it went back to the waiting queue.
                break
            scheduled.append((seq, n))
            budget -= n
            if seq.prefilling:
                prefill += n
            i += 1
        return budget, prefill

    def _grow(self, seq: Seq, n: int) -> bool:
        """Give ``seq`` blocks for ``n`` more tokens, preempting others when out of blocks."""
        if seq.num_computed + n <= len(seq.blocks) * self.profile.block_size:
            return True  # the common decode step: room left in its last block
        need = self._blocks_for(seq.num_computed + n) - len(seq.blocks)
        while need > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.blocks.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.state = State.WAITING
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1

    def _schedule_waiting(self, scheduled: list[tuple[Seq, int]], budget: int,
                          prefill: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.profile.max_num_seqs:
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n == 0:
                break  # FIFO: the head waits for blocks, and so does everyone behind it
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
            prefill += n
        return prefill

    def _admit(self, seq: Seq, budget: int) -> int:
        """Take prefix hits and blocks for the head of the queue; tokens scheduled or 0."""
        bs = self.profile.block_size
        hits = self.pool.cached_prefix(seq.block_hashes)
        # At least one token must be computed to sample from (vLLM does the same).
        hits = min(hits, (seq.length - 1) // bs)
        hit_hashes = seq.block_hashes[:hits]
        computed = hits * bs
        n = min(seq.length - computed, budget)
        need = self._blocks_for(computed + n) - hits
        if need > self.pool.free_after_touch(hit_hashes):
            return 0
        seq.blocks = self.pool.touch(hit_hashes)
        seq.blocks.extend(self.pool.allocate(need))
        seq.num_computed = computed
        seq.num_registered = hits
        seq.num_cached_tokens = computed
        seq.state = State.RUNNING
        if seq.admitted is None:
            seq.admitted = self.clock()
        self.counters.prefix_queries += seq.length
        self.counters.prefix_hits += computed
        return n

    def state(self) -> dict[str, object]:
        """A snapshot for ``GET /sim/state`` (debugging and tests)."""
        c = self.counters
        return {"running": len(self.running), "waiting": len(self.waiting),
                "num_gpu_blocks": self.pool.num_blocks, "free_blocks": self.pool.num_free,
                "cached_blocks": self.pool.num_cached, "kv_cache_usage": self.pool.usage,
                "prompt_tokens": c.prompt_tokens, "generation_tokens": c.generation_tokens,
                "prefill_computed_tokens": c.prefill_computed,
                "prefix_cache_queries": c.prefix_queries, "prefix_cache_hits": c.prefix_hits,
                "preemptions": c.preemptions, "steps": c.steps, "finished": dict(c.finished)}

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.profile.block_size)

    def complete(self, plan: StepPlan) -> None:
        """Apply a step: advance computed tokens, sample, register blocks, finish."""
        now = self.clock()
        for seq, n in plan.scheduled:
            if seq.state is not State.RUNNING:
                continue  # aborted or preempted while the step ran
            seq.num_computed += n
            if seq.num_registered < len(seq.block_hashes):
                self._register_blocks(seq)
            if seq.num_computed < seq.length:
                continue  # still prefilling (chunked)
            self._sample(seq, now)

    def _sample(self, seq: Seq, now: float) -> None:
        if seq.first_token is None:
            self.counters.prompt_tokens += seq.num_prompt_tokens
            seq.first_token = now
        seq.num_generated += 1
        seq.last_token = now
        self.counters.generation_tokens += 1
        if seq.num_generated >= seq.output_len:
            self.running.remove(seq)
            self.pool.release(seq.blocks)
            seq.blocks = []
            self._finish(seq, seq.finish_reason)
        elif seq.on_progress is not None:
            seq.on_progress(seq)

    def _register_blocks(self, seq: Seq) -> None:
        full = min(seq.num_computed, seq.num_prompt_tokens) // self.profile.block_size
        while seq.num_registered < full:
            i = seq.num_registered
            h = seq.block_hashes[i]
            if seq.blocks[i] is None and self.pool.register(h):
                seq.blocks[i] = h
            seq.num_registered += 1

    def _finish(self, seq: Seq, reason: str) -> None:
        seq.state = State.FINISHED
        seq.finished = self.clock()
        seq.finish_reason = reason
        self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1
        if self.on_finish is not None:
            self.on_finish(seq)
        done = seq.on_done or seq.on_progress
        if done is not None:
            done(seq)
