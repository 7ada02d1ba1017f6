"""The router: filter → score by predicted time to first token → ordered candidates.

Filter (every replica applies the same rules): the backend serves the canonical model and
the task, it is routable in the registry (ready, node up, not cordoned or draining), and
the request's KV tokens (prompt + max_tokens) fit its KV capacity, and the fewest tokens
the prompt can be (:attr:`Prompt.least_tokens`, :mod:`context_length`: a floor for any
tokenizer, not the router's count) are no more than its context (``max_model_len``, when
its agent reports one). A backend whose
*free* KV is too small right now is only used when no backend has room (the engine then
queues the request rather than Synapse refusing it).

Score — :func:`predict`, the one function both routing and ``explain`` use — is the
predicted TTFT in seconds, not a sum of hand-tuned weights:

* queue wait = prefill time of the tokens already waiting on that backend (this
  replica's ledger, plus requests the engine reports waiting that this replica did not
  send, at the mean prompt size) + one decode step when the engine is busy decoding,
  scaled up as its KV cache fills (a nearly full cache preempts and queues), + the
  backend's fixed time to a first token;
* prefill = (prompt tokens - tokens of the prompt's prefix cached there) * seconds per
  token; cached tokens come from the prefix index of chained block hashes over the
  prompt's token ids (the model's own tokenizer when configured, else the approximation:
  :mod:`tokenization`), in the backend's block size.

The seconds per prefill token, per decode step and the fixed time are each backend's own,
learned from its answers (:mod:`costs`: :meth:`Router.observe`, called by the proxy when
a request settles, which also reports predicted against observed TTFT and cached tokens
to the observers, i.e. the metrics); until a backend has answered enough, the configured
constants.

Ordering is by that prediction, with one correction: the backend holding the longest
cached prefix keeps the request unless another is predicted faster by more than the
prefill the move would add (that work also delays whoever queues behind it), so a
busy-but-not-saturated holder is not abandoned for a small gain that costs the fleet a
second copy of the prefix. Ties (within ``TIE_S`` or ``TIE_FRACTION``) go to the backend
that served the request's session before (``x-session-id`` or the OpenAI ``user`` field). Other
policies, for comparison: ``round_robin`` and ``least_loaded`` (fewest in-flight requests).

Sessions are per tenant: :attr:`Prompt.session` holds :func:`session_key` (the tenant and a
fixed-size digest of its session id), never the bare id. Tenants choose session ids freely
(often their end users' e-mails), so a shared table would let one tenant learn, from
``x-synapse-route: session`` on its first request, that another tenant uses an id, see its
backend, and re-pin it. Ids are unbounded too (the body's ``user``): kept as they came, a
tenant sending unique megabyte ids filled the table, and each sibling worker's copy of it,
with no bound in bytes.

Worker processes of one pod share what a dispatch records (:mod:`shared_routing`): the
prefix index and session affinity through :attr:`Router.listener`, the ledger through its
own; a peer's records come back in through :attr:`Router.index` and
:meth:`Router.remember_session`. Without a listener the cost is a ``None`` check.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol

from controlplane.core import costs as costs_mod
from controlplane.core import ledger as ledger_mod
from controlplane.core import prefix_index, registry, tenant_lru, tokenization, types
from controlplane.core import usage as usage_mod

TIE_S = 0.002
TIE_FRACTION = 0.05
SESSION_MEMORY = 50_000     # sessions remembered in all, split equally between tenants
SESSION_DIGEST_BYTES = 16   # of a session id in its key: collisions need ~2**64 ids
_SESSION_PERSON = b"synapse-session"
DEFAULT_PROMPT_TOKENS = 256

Prompt = tokenization.Prompt
Observer = Callable[[types.RouteObservation], None]


def session_key(tenant: str, session: str) -> str:
    """The router's name for ``tenant``'s session ``session`` ("" = no session): the one
    rule every caller forms :attr:`Prompt.session` with. The tenant's length comes first,
    so no pair of (tenant, session) names another pair's key whatever either contains.

    The session id itself is kept only as a digest of (tenant, session), of
    :data:`SESSION_DIGEST_BYTES`: a client chooses the id (the body's ``user`` has no
    length bound), and the key is what the sessions table keeps and the routing mesh
    sends to sibling workers, so a key grows with the tenant's (configured) name only,
    never with what a client sends. Nor does the key hold an end user's id as sent."""
    if not session:
        return ""
    named = f"{len(tenant)}:{tenant}:"
    digest = hashlib.blake2b((named + session).encode("utf-8", "surrogatepass"),
                             digest_size=SESSION_DIGEST_BYTES, person=_SESSION_PERSON)
    return named + digest.hexdigest()


def session_tenant(key: str) -> str:
    """The tenant of a :func:`session_key` (the part before its session id); "" for a
    key not made by :func:`session_key` (all such keys share one partition)."""
    length, sep, rest = key.partition(":")
    return rest[:int(length)] if sep and length.isascii() and length.isdigit() else ""


class Listener(Protocol):
    """Told what each dispatch records beside the ledger (a mesh of sibling workers)."""

    def prefix(self, backend: str, hashes: Sequence[int], capacity_blocks: int,
               restarts: int) -> None: ...

    def session(self, session: str, backend: str) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Params:
    policy: str = "predicted_ttft"
    block_size: int = 16
    prefill_s_per_token: float = 0.00012
    decode_s_per_step: float = 0.02
    session_affinity: bool = True
    learn_costs: bool = True


def predict(backend: types.BackendState, load: ledger_mod.Load, prompt_tokens: int,
            cached_tokens: int, costs: costs_mod.Costs,
            ) -> tuple[float, float, float, float]:
    """(queue wait, prefill, queued tokens, decode wait) for a request on ``backend``: the
    one score (TTFT = queue wait + prefill; the last two are the queue wait's parts)."""
    p = costs.prefill_s_per_token
    # Requests the engine reports waiting beyond everything this replica has in flight
    # there: other replicas' traffic (reports lag, so compare with all of ours).
    foreign = max(0, backend.waiting - load.in_flight)
    mean_prompt = load.mean_prompt_tokens or DEFAULT_PROMPT_TOKENS
    queued = load.prefill_tokens + foreign * mean_prompt
    decode = costs.decode_s_per_step if max(load.decoding, backend.running) > 0 else 0.0
    if backend.kv_usage > 0.9:  # a nearly full cache preempts and queues
        scale = 1.0 + 10.0 * (backend.kv_usage - 0.9)
        queued, decode = queued * scale, decode * scale
    prefill = max(0, prompt_tokens - cached_tokens) * p
    return costs.overhead_s + queued * p + decode, prefill, queued, decode


def cached_tokens(matched_blocks: int, prompt_tokens: int, block_size: int) -> int:
    """Tokens an engine takes from its prefix cache: whole blocks, and never the prompt's
    last token (vLLM computes at least one token to sample from; so does the simulator)."""
    return min(matched_blocks, max(0, prompt_tokens - 1) // block_size) * block_size


class Router:
    def __init__(self, params: Params, reg: registry.Registry, ledger: ledger_mod.Ledger,
                 index: prefix_index.PrefixIndex,
                 tokenizers: tokenization.Tokenizers | None = None,
                 costs: costs_mod.CostModel | None = None) -> None:
        self.params = params
        self._registry = reg
        self._ledger = ledger
        self._index = index
        self._hashes = prefix_index.BlockHasher()   # the prompt's chained block hashes
        self._tokenizers = tokenizers or tokenization.Tokenizers()
        self.costs = costs or costs_mod.CostModel(params.prefill_s_per_token,
                                                  params.decode_s_per_step, params.learn_costs)
        self._observers: list[Observer] = []
        self._turn = 0   # rotates exact ties: advanced by route(), only read by explain()
        # session key -> backend, per tenant (one tenant's sessions never push out
        # another's); the pod's services split SESSION_MEMORY between its tenants
        self.sessions: tenant_lru.TenantLRU[str] = tenant_lru.TenantLRU(SESSION_MEMORY)
        self.listener: Listener | None = None

    @property
    def ledger(self) -> ledger_mod.Ledger:
        return self._ledger

    @property
    def index(self) -> prefix_index.PrefixIndex:
        return self._index

    @property
    def exact_prompts(self) -> bool:
        """Whether this policy needs token ids (hashing costs CPU; others skip it)."""
        return self.params.policy == "predicted_ttft"

    def prompt_tokens(self, prompt: Prompt, model: str) -> int:
        """``prompt``'s length in tokens as the router counts it for ``model`` (the model's
        own tokenizer when configured, else the approximation): a function of the prompt
        alone, never of what earlier requests left in the index."""
        return len(prompt.ids(self._tokenizers.for_model(model)))

    def block_size(self, backend: types.BackendState) -> int:
        return backend.block_size or self.params.block_size

    # -- filter and score ---------------------------------------------------------------

    def _filter(self, b: types.BackendState, need: int, prompt: Prompt) -> str:
        context = b.max_model_len   # (the prompt's floor is counted only when one is known)
        if context and (least := prompt.least_tokens) > context:
            return f"prompt of at least {least} tokens, context {context}"
        if b.kv_capacity_tokens and need > b.kv_capacity_tokens:
            return f"needs {need} KV tokens, capacity {b.kv_capacity_tokens}"
        free = b.free_kv_tokens
        if free is not None and need > free:
            return f"kv-full: needs {need} KV tokens, {free} free"
        return ""

    def _verdict(self, b: types.BackendState, why: str, prompt: Prompt,
                 ids: tuple[int, ...], hashes: dict[int, tuple[int, ...]]) -> types.Verdict:
        n = prompt.tokens
        need = n + prompt.max_tokens
        reason = why or self._filter(b, need, prompt)
        bs = self.block_size(b)
        cached = 0
        if ids and not (b.kv_capacity_tokens and need > b.kv_capacity_tokens):
            # (a prompt its KV cache can never hold has no prefix there to find: not hashed)
            if bs not in hashes:
                hashes[bs] = self._hashes(ids, bs, prompt.hash_seed)
            cached = cached_tokens(self._index.match(b.key, hashes[bs]), n, bs)
        c = self.costs.costs(b.key)
        queue, prefill, queued, decode = predict(b, self._ledger.load(b.key), n, cached, c)
        affinity = bool(prompt.session) and self.sessions.peek(
            session_tenant(prompt.session), prompt.session) == b.key
        basis = types.Basis(prompt.tokenizer, bs, queued, decode, *c)
        return types.Verdict(b, not reason, reason, queue + prefill, queue, prefill, n, cached,
                             affinity, 0, basis)

    def verdicts(self, model: str, prompt: Prompt, task: types.Task = "generate",
                 ) -> tuple[list[types.Verdict], dict[int, tuple[int, ...]]]:
        hashes: dict[int, tuple[int, ...]] = {}
        ids = prompt.ids(self._tokenizers.for_model(model))
        out = [self._verdict(b, why, prompt, ids, hashes)
               for b, why in self._registry.backends_for(model) if b.serves(task)]
        return out, hashes

    # -- ordering -----------------------------------------------------------------------

    def _order(self, eligible: list[types.Verdict]) -> tuple[list[types.Verdict], str]:
        policy = self.params.policy
        if policy == "round_robin":
            eligible.sort(key=lambda v: v.backend.key)
            start = self._turn % len(eligible)
            return eligible[start:] + eligible[:start], "round-robin"
        if policy == "least_loaded":
            eligible.sort(key=lambda v: (self._ledger.load(v.backend.key).in_flight
                                         + v.backend.waiting, v.backend.key))
            return eligible, "least-loaded"
        several = len(eligible) > 1     # one candidate: nothing to order or move
        if several:
            # Exact ties (idle backends, no cached prefix) rotate instead of piling on one.
            eligible.sort(key=lambda v: v.backend.key)
            start = self._turn % len(eligible)
            eligible = eligible[start:] + eligible[:start]
            eligible.sort(key=lambda v: (v.predicted_ttft_s,
                                         self._ledger.load(v.backend.key).in_flight))
            self._within_noise(eligible)
        best = eligible[0]
        reason = "least-ttft"
        tie = max(TIE_S, best.predicted_ttft_s * TIE_FRACTION)
        if self.params.session_affinity:
            for i, v in enumerate(eligible):
                if v.session_affinity and v.predicted_ttft_s - best.predicted_ttft_s <= tie:
                    eligible.insert(0, eligible.pop(i))
                    return eligible, "session"
        if several:
            self._keep_holder(eligible)
        if eligible[0].cached_tokens and eligible[0].prompt_tokens:
            pct = 100 * eligible[0].cached_tokens // eligible[0].prompt_tokens
            reason = f"prefix-hit {pct}%"
        return eligible, reason

    def _within_noise(self, ordered: list[types.Verdict]) -> None:
        """Among the backends predicted faster than the best by less than the prediction's
        own typical error there (learned), take the one with the fewest requests in
        flight: a difference the router cannot predict is no reason to pile up."""
        best = ordered[0]
        noise = best.basis.ttft_error_s if best.basis else 0.0
        if noise <= TIE_S:
            return
        load = self._ledger.load
        pick = min((v for v in ordered if v.predicted_ttft_s - best.predicted_ttft_s <= noise
                    and v.cached_tokens == best.cached_tokens),
                   key=lambda v: load(v.backend.key).in_flight)
        if pick is not best:
            ordered.remove(pick)
            ordered.insert(0, pick)

    def _keep_holder(self, ordered: list[types.Verdict]) -> None:
        """Move the backend holding most of the prompt first unless leaving it pays twice.

        Moving a request away from the backend that caches its prefix wins it the queue
        difference but costs the prefill of that prefix again elsewhere, and that extra
        work delays every request queued behind it there too. So the holder keeps the
        request unless its predicted TTFT is worse by more than that extra prefill — both
        figures are parts of the one TTFT prediction.
        """
        best = ordered[0]
        holder = max(ordered, key=lambda v: (v.cached_tokens, -v.predicted_ttft_s))
        if holder is best or holder.cached_tokens <= best.cached_tokens:
            return
        extra_prefill = (holder.cached_tokens - best.cached_tokens) * best.prefill_s_per_token
        if holder.predicted_ttft_s - best.predicted_ttft_s < extra_prefill:
            ordered.remove(holder)
            ordered.insert(0, holder)

    def route(self, model: str, prompt: Prompt, task: types.Task = "generate",
              ) -> types.RouteDecision | None:
        """Ordered candidates for ``model``, or None when no backend passes the filter."""
        decision = self._decide(model, prompt, task)
        if decision is not None:
            self._turn += 1
        return decision

    def _decide(self, model: str, prompt: Prompt, task: types.Task,
                ) -> types.RouteDecision | None:
        """What :meth:`route` answers, without moving any state (explain shares it)."""
        verdicts, hashes = self.verdicts(model, prompt, task)
        eligible = [v for v in verdicts if v.eligible]
        reason_suffix = ""
        if not eligible:
            # Everyone is merely short of free KV: let the engines queue it.
            eligible = [dataclasses.replace(v, eligible=True) for v in verdicts
                        if v.filter_reason.startswith("kv-full")]
            reason_suffix = ", kv-overcommit"
            if not eligible:
                return None
        ordered, reason = self._order(eligible)
        # Candidates are in rank order; the rank field itself is filled in by explain()
        # only (copying every verdict per request costs more than routing it).
        ranked = tuple(ordered)
        info = types.PromptInfo(prompt.tokens, hashes, prompt.max_tokens, prompt.session,
                                prompt.tokenizer, prompt.sequences)
        return types.RouteDecision(model, ranked, reason + reason_suffix,
                                   self.params.policy, info)

    def explain(self, model: str, prompt: Prompt, task: types.Task = "generate",
                ) -> tuple[list[types.Verdict], str]:
        """Every backend of the model with its verdict; the chosen one has rank 1 — the one
        the next request would get: explaining moves nothing (ledger, prefix index,
        sessions, the rotation of ties)."""
        decision = self._decide(model, prompt, task)
        verdicts, _ = self.verdicts(model, prompt, task)
        if decision is None:
            return verdicts, "no backend passes the filter"
        ranks = {v.backend.key: dataclasses.replace(v, rank=i + 1)
                 for i, v in enumerate(decision.candidates)}
        return [ranks.get(v.backend.key, v) for v in verdicts], decision.reason

    # -- bookkeeping at dispatch and settlement ---------------------------------------

    def dispatched(self, decision: types.RouteDecision, verdict: types.Verdict,
                   prompt: Prompt) -> ledger_mod.Ticket:
        """Record a dispatch: ledger, prefix index, session affinity. The ticket carries
        the verdict, so :meth:`observe` can compare it with what happens."""
        b = verdict.backend
        if prompt.exact:
            bs = self.block_size(b)
            cap = b.kv_capacity_tokens // bs if b.kv_capacity_tokens else 0
            hashes = decision.prompt.hashes_by_block_size.get(bs)
            if hashes is None:
                ids = prompt.ids(self._tokenizers.for_model(decision.model))
                hashes = self._hashes(ids, bs, prompt.hash_seed)
            self._index.insert(b.key, hashes, cap, b.restarts)
            if self.listener is not None:
                self.listener.prefix(b.key, hashes, cap, b.restarts)
        if prompt.session and self.params.session_affinity:
            self.remember_session(prompt.session, b.key)
            if self.listener is not None:
                self.listener.session(prompt.session, b.key)
        uncached = max(0, verdict.prompt_tokens - verdict.cached_tokens)
        ticket = self._ledger.dispatch(b.key, uncached, verdict.prompt_tokens, prompt.streams,
                                       verdict.predicted_ttft_s, prompt.sequences)
        ticket.prediction = verdict
        return ticket

    def remember_session(self, session: str, backend: str) -> None:
        """``session`` (a :func:`session_key`) last went to ``backend`` (a tie goes there
        next time), among its tenant's sessions only."""
        self.sessions.put(session_tenant(session), session, backend)

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer`` with every :class:`types.RouteObservation` (metrics)."""
        self._observers.append(observer)

    def observe(self, ticket: ledger_mod.Ticket) -> types.RouteObservation | None:
        """Learn from a settled request and report it to the observers.

        Called once the ledger has finished ``ticket`` (the proxy's settle point), with
        ``ticket.streamed`` set when its first byte was a streamed token and
        ``ticket.usage`` the engine's :class:`usage.Usage` when the proxy found one.
        Requests that never got an answer teach nothing and return None.
        """
        v = ticket.prediction
        if not isinstance(v, types.Verdict) or v.basis is None or ticket.first_byte_at is None:
            return None
        u = ticket.usage if isinstance(ticket.usage, usage_mod.Usage) else None
        reported_cached = u.cached_tokens if u is not None else None
        # Uncached tokens in the router's own units (its tokenizer's count), so a learned
        # cost multiplies the counts it is used with.
        if u is not None and u.prompt_tokens and reported_cached is not None:
            uncached = v.prompt_tokens * (1.0 - reported_cached / u.prompt_tokens)
        else:
            uncached = float(v.prompt_tokens - v.cached_tokens)
        key = v.backend.key
        ttft = None
        if ticket.streamed:
            ttft = ticket.first_byte_at - ticket.dispatched_at
            last = ticket.finished_at if ticket.finished_at is not None else \
                ticket.first_byte_at
            self.costs.observe(key, ttft, v.basis.queued_tokens, uncached,
                               v.basis.decode_wait_s, last - ticket.first_byte_at,
                               u.completion_tokens if u is not None else 0,
                               ttft - v.predicted_ttft_s)
        c = self.costs.costs(key)
        obs = types.RouteObservation(
            key, v.basis.tokenizer, v.predicted_ttft_s, ttft, v.cached_tokens, reported_cached,
            v.prompt_tokens, u.prompt_tokens if u is not None else None,
            c.prefill_s_per_token, c.decode_s_per_step, c.overhead_s)
        for observer in self._observers:
            observer(obs)
        return obs
