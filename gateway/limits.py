"""Per-tenant rate limits (requests/min and tokens/min) that hold across gateway replicas.

Algorithm: GCRA (generic cell rate algorithm), one independent cell per tenant and kind.
Each cell stores one number, the *theoretical arrival time* (TAT).  With ``interval`` =
60 s / per-minute limit and ``capacity`` = the burst size (units admitted at once from
rest), a request costing ``cost`` units at time ``now`` is admitted iff

    max(TAT, now) + cost * interval - capacity * interval <= now

and then TAT becomes ``max(TAT, now) + cost * interval``.  Consequences, for any window of
length W: at most ``capacity + rate * W`` units are admitted, and a tenant that keeps
asking gets exactly ``rate`` in the long run.  A denied request changes nothing, so
hammering does not push a tenant's next admission further out.  Because the state is a
time, not a count, changing a tenant's limit takes effect at once without migration.

Both kinds are checked together: a request is admitted only if *both* cells admit it,
and then both are charged; otherwise neither is.  ``retry_after_s`` is the wait until
both would admit this same request (the larger of the two waits), and ``limit_kind``
names the kind that needs the longer wait.

Implementations (the arithmetic is the pure functions below, shared by both):

* :class:`RedisRateLimiter` -- for several replicas.  One Lua script, run with EVALSHA,
  reads both cells, decides and writes both cells atomically (Redis runs a script
  alone), with the Redis server's clock (``TIME``), so replicas cannot race and their
  clocks do not matter.  Keys expire when the cell is back at rest.
* :class:`LocalRateLimiter` -- the same arithmetic in process, for a single replica.

Token accounting.  The real token count of a call is known only afterwards.  The
gateway passes an *estimate* to ``acquire`` (the prompt's token count, which it can
measure, plus the requested ``max_tokens`` if it wants to be conservative) and, after
the call, ``reconcile(tenant, estimated, actual)`` charges the difference: a positive
difference is charged unconditionally (it can put the tenant into debt, so its next
requests wait), a negative one is refunded (never beyond a full burst).  So tokens/min
is exact over time, but a single call may overshoot by what its estimate missed;
``acquire(tenant, tokens=0)`` + ``reconcile(tenant, 0, actual)`` is valid and means
"admit while not in debt".  A request whose estimate exceeds the token burst capacity
can never be admitted: its decision has ``retry_after_s == math.inf`` (answer it with a
4xx that says so, not with a Retry-After).

Redis failure: the constructor chooses.  ``fail_open=True`` (default) admits and logs a
warning (at most one per ``warn_every_s``), ``fail_open=False`` refuses with
``limit_kind="unavailable"``.  Either way ``Decision.degraded`` is True and
``backend_failures`` counts it.  Redis restart loses the cells: tenants get a fresh burst.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "EPOCH_S",
    "EPS_S",
    "GCRA_LUA",
    "Decision",
    "GcraStep",
    "Limits",
    "LimitsLookup",
    "LocalRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "Remaining",
    "decide",
    "gcra_charge",
    "gcra_remaining",
    "gcra_step",
    "static_limits",
]

log = logging.getLogger("ledgerflow.gateway.limits")

#: Redis timestamps are taken relative to this epoch (2025-01-01T00:00:00Z) so a double keeps
#: nanosecond-scale resolution (seconds since 1970 would leave ~0.24 µs).
EPOCH_S = 1_735_689_600
#: Tolerance on "may I go now": admit up to 1 µs early, so waiting exactly retry_after_s works
#: despite floating-point rounding.
EPS_S = 1e-6

LimitKind = Literal["requests", "tokens", "unavailable"]


# ---------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant's limits; 0 means unlimited.

    ``request_burst`` / ``token_burst`` are the GCRA capacities: how many units are admitted
    at once from rest.  Defaults: 10 seconds' worth of requests (at least 1), and a whole
    minute's worth of tokens (one call may be large; a call larger than the token burst is
    never admitted).
    """

    requests_per_min: int = 0
    tokens_per_min: int = 0
    request_burst: int | None = None
    token_burst: int | None = None

    def __post_init__(self) -> None:
        if self.requests_per_min < 0 or self.tokens_per_min < 0:
            raise ValueError("requests_per_min and tokens_per_min must be >= 0 (0 = unlimited)")
        for name in ("request_burst", "token_burst"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the default)")

    @property
    def request_capacity(self) -> int:
        if self.request_burst is not None:
            return self.request_burst
        return max(1, math.ceil(self.requests_per_min / 6))

    @property
    def token_capacity(self) -> int:
        return self.token_burst if self.token_burst is not None else self.tokens_per_min

    @property
    def request_interval(self) -> float:
        """Seconds per request (0.0 = unlimited)."""
        return 60.0 / self.requests_per_min if self.requests_per_min else 0.0

    @property
    def token_interval(self) -> float:
        """Seconds per token (0.0 = unlimited)."""
        return 60.0 / self.tokens_per_min if self.tokens_per_min else 0.0

    @property
    def unlimited(self) -> bool:
        return not self.requests_per_min and not self.tokens_per_min


#: Tenant -> its limits.  The gateway's seam for per-tenant configuration (e.g. folded from a
#: compacted topic); must be cheap and non-blocking.
LimitsLookup = Callable[[str], Limits]


def static_limits(default: Limits, per_tenant: Mapping[str, Limits] | None = None) -> LimitsLookup:
    """A lookup from a fixed mapping with a default for tenants not in it."""
    table = dict(per_tenant or {})
    return lambda tenant: table.get(tenant, default)


def _as_lookup(limits: Limits | LimitsLookup) -> LimitsLookup:
    if isinstance(limits, Limits):
        return static_limits(limits)
    return limits


# -------------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class Remaining:
    """Units that could still be admitted right now (None = that kind is unlimited)."""

    requests: int | None = None
    tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: 0.0 when allowed; seconds until this same request would be admitted; math.inf if never
    #: (its token estimate exceeds the token burst capacity).
    retry_after_s: float
    #: Why not: "requests", "tokens", or "unavailable" (Redis down, fail-closed); None if allowed.
    limit_kind: LimitKind | None
    remaining: Remaining = field(default_factory=Remaining)
    #: The limits applied (for X-RateLimit-* headers).
    limits: Limits | None = None
    #: The backend failed and this decision is the fail-open/closed policy's, not the limit's.
    degraded: bool = False

    @property
    def retry_after_header(self) -> str | None:
        """``Retry-After`` value (whole seconds, rounded up, at least 1), or None."""
        if self.allowed or math.isinf(self.retry_after_s):
            return None
        return str(max(1, math.ceil(self.retry_after_s)))

    def headers(self) -> dict[str, str]:
        """``Retry-After`` when refused, plus OpenAI-style ``x-ratelimit-*`` for the limited kinds."""
        out: dict[str, str] = {}
        retry = self.retry_after_header
        if retry is not None:
            out["Retry-After"] = retry
        if self.limits is not None:
            if self.limits.requests_per_min and self.remaining.requests is not None:
                out["x-ratelimit-limit-requests"] = str(self.limits.requests_per_min)
                out["x-ratelimit-remaining-requests"] = str(self.remaining.requests)
            if self.limits.tokens_per_min and self.remaining.tokens is not None:
                out["x-ratelimit-limit-tokens"] = str(self.limits.tokens_per_min)
                out["x-ratelimit-remaining-tokens"] = str(self.remaining.tokens)
        return out


_UNLIMITED = Decision(allowed=True, retry_after_s=0.0, limit_kind=None)


class RateLimiter(Protocol):
    async def acquire(self, tenant: str, tokens: int = 0) -> Decision:
        """Admit one request of ``tokens`` estimated tokens for ``tenant``, or say when to retry."""
        ...

    async def reconcile(self, tenant: str, estimated: int, actual: int) -> None:
        """After the call: charge ``actual - estimated`` tokens (refund if negative). Never refuses."""
        ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------ GCRA: pure arithmetic
#
# Every operation below is mirrored one for one by GCRA_LUA, in the same order, on IEEE
# doubles (Python floats, Lua numbers), so both implementations reach bit-identical
# decisions from the same timestamps.  Change both together; tests/test_limits.py checks.


@dataclass(frozen=True, slots=True)
class GcraStep:
    allowed: bool
    base: float  # max(tat, now): the cell's state as of now
    new_tat: float  # the state to store if the request is admitted
    wait: float  # 0.0 if allowed, else seconds until it would be (inf: never)


def gcra_step(tat: float | None, now: float, cost: int, interval: float, capacity: int) -> GcraStep:
    """Would a request of ``cost`` units be admitted at ``now``?  Pure; stores nothing."""
    base = now
    if tat is not None and tat > now:
        base = tat
    new_tat = base + cost * interval
    if cost > capacity:
        return GcraStep(False, base, new_tat, math.inf)
    wait = (new_tat - capacity * interval) - now
    if wait > EPS_S:
        return GcraStep(False, base, new_tat, wait)
    return GcraStep(True, base, new_tat, 0.0)


def gcra_remaining(tat: float, now: float, interval: float, capacity: int) -> int:
    """Unit-cost requests admissible at ``now`` if the cell's state is ``tat`` (>= now).

    The largest k with ``gcra_step`` admitting cost k, i.e. with the same EPS_S slack.
    """
    rem = math.floor((capacity * interval - (tat - now) + EPS_S) / interval)
    return max(rem, 0)


def gcra_charge(tat: float | None, now: float, cost: int, interval: float) -> float:
    """Unconditional charge (``cost`` > 0: debt) or refund (``cost`` < 0, never beyond rest)."""
    base = now
    if tat is not None and tat > now:
        base = tat
    new_tat = base + cost * interval
    if new_tat < now:
        new_tat = now
    return new_tat


def decide(
    limits: Limits, req_tat: float | None, tok_tat: float | None, now: float, tokens: int
) -> tuple[Decision, float | None, float | None]:
    """Both kinds at once: the decision and the cells' new TATs (None = leave the cell alone)."""
    r_int, t_int = limits.request_interval, limits.token_interval
    r_step = gcra_step(req_tat, now, 1, r_int, limits.request_capacity) if r_int > 0 else None
    t_step = gcra_step(tok_tat, now, tokens, t_int, limits.token_capacity) if t_int > 0 else None
    r_ok = r_step is None or r_step.allowed
    t_ok = t_step is None or t_step.allowed
    if r_ok and t_ok:
        remaining = Remaining(
            None if r_step is None else gcra_remaining(r_step.new_tat, now, r_int, limits.request_capacity),
            None if t_step is None else gcra_remaining(t_step.new_tat, now, t_int, limits.token_capacity),
        )
        decision = Decision(True, 0.0, None, remaining, limits)
        return decision, (None if r_step is None else r_step.new_tat), (None if t_step is None else t_step.new_tat)
    r_wait = 0.0 if r_step is None else r_step.wait
    t_wait = 0.0 if t_step is None else t_step.wait
    kind: LimitKind = "requests" if r_wait >= t_wait else "tokens"
    remaining = Remaining(
        None if r_step is None else gcra_remaining(r_step.base, now, r_int, limits.request_capacity),
        None if t_step is None else gcra_remaining(t_step.base, now, t_int, limits.token_capacity),
    )
    return Decision(False, max(r_wait, t_wait), kind, remaining, limits), None, None


# -------------------------------------------------------------------- in process


class LocalRateLimiter:
    """GCRA in this process: exact for a single replica; N replicas would admit N times the limit.

    Safe within one event loop (no await between read and write); not thread-safe.
    ``clock`` is monotonic seconds (injectable for tests).
    """

    _SWEEP_EVERY = 4096

    def __init__(self, limits: Limits | LimitsLookup, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = _as_lookup(limits)
        self._clock = clock
        self._cells: dict[str, list[float | None]] = {}  # tenant -> [request TAT, token TAT]
        self._calls = 0

    def acquire_nowait(self, tenant: str, tokens: int = 0) -> Decision:
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        limits = self._lookup(tenant)
        if limits.unlimited:
            return _UNLIMITED
        now = self._clock()
        self._maybe_sweep(now)
        cell = self._cells.get(tenant) or [None, None]
        decision, r_new, t_new = decide(limits, cell[0], cell[1], now, tokens)
        if decision.allowed:
            if r_new is not None:
                cell[0] = r_new
            if t_new is not None:
                cell[1] = t_new
            self._cells[tenant] = cell
        return decision

    async def acquire(self, tenant: str, tokens: int = 0) -> Decision:
        return self.acquire_nowait(tenant, tokens)

    def reconcile_nowait(self, tenant: str, estimated: int, actual: int) -> None:
        limits = self._lookup(tenant)
        delta = actual - estimated
        if not limits.tokens_per_min or delta == 0:
            return
        cell = self._cells.get(tenant) or [None, None]
        cell[1] = gcra_charge(cell[1], self._clock(), delta, limits.token_interval)
        self._cells[tenant] = cell

    async def reconcile(self, tenant: str, estimated: int, actual: int) -> None:
        self.reconcile_nowait(tenant, estimated, actual)

    async def aclose(self) -> None:
        self._cells.clear()

    def _maybe_sweep(self, now: float) -> None:
        """Forget cells back at rest (TAT <= now is the same as no cell), so memory stays bounded."""
        self._calls += 1
        if self._calls % self._SWEEP_EVERY:
            return
        idle = [t for t, (r, k) in self._cells.items() if (r is None or r <= now) and (k is None or k <= now)]
        for tenant in idle:
            del self._cells[tenant]


# -------------------------------------------------------------------------- Redis

GCRA_LUA = """
-- ledgerflow GCRA: both cells of one tenant, checked and updated atomically.
-- KEYS[1] request cell, KEYS[2] token cell (same hash slot: {tenant}).
-- ARGV[1] mode: 'a' acquire (update both cells only if both admit) | 'c' charge tokens (never refuses)
-- ARGV[2] request interval s (0 = unlimited)   ARGV[3] request capacity
-- ARGV[4] token interval s (0 = unlimited)     ARGV[5] token capacity
-- ARGV[6] token cost ('c': signed)             ARGV[7] now override ('' = server TIME)
-- Reply 'a': {allowed 0|1, wait, kind, requests remaining (-1 unlimited), tokens remaining, now}
-- Reply 'c': {now}.  Floats travel as %.17g strings (exact round trip).
-- Mirrors gateway/limits.py gcra_step / gcra_remaining / gcra_charge / decide op for op.
local EPOCH = 1735689600
local EPS = 1e-6
local now
if ARGV[7] == '' then
  local t = redis.call('TIME')
  now = (tonumber(t[1]) - EPOCH) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[7])
end
local function fmt(x) return string.format('%.17g', x) end
local function load(key)
  local v = redis.call('GET', key)
  if v then return tonumber(v) end
  return nil
end
local function store(key, tat)
  local ttl = tat - now
  if ttl > 0 then
    -- +1 s: an expired cell equals one at rest, so expiring late is harmless
    redis.call('SET', key, fmt(tat), 'PX', math.ceil(ttl * 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end
local function step(tat, cost, interval, capacity)
  local base = now
  if tat ~= nil and tat > now then base = tat end
  local new_tat = base + cost * interval
  if cost > capacity then return false, base, new_tat, math.huge end
  local wait = (new_tat - capacity * interval) - now
  if wait > EPS then return false, base, new_tat, wait end
  return true, base, new_tat, 0.0
end
local function remaining(tat, interval, capacity)
  local rem = math.floor((capacity * interval - (tat - now) + EPS) / interval)
  if rem < 0 then rem = 0 end
  return rem
end

local r_int = tonumber(ARGV[2])
local r_cap = tonumber(ARGV[3])
local t_int = tonumber(ARGV[4])
local t_cap = tonumber(ARGV[5])
local cost = tonumber(ARGV[6])

if ARGV[1] == 'c' then
  local tat = load(KEYS[2])
  local base = now
  if tat ~= nil and tat > now then base = tat end
  local new_tat = base + cost * t_int
  if new_tat < now then new_tat = now end
  store(KEYS[2], new_tat)
  return {fmt(now)}
end

local r_ok, r_base, r_new, r_wait = true, now, now, 0.0
local t_ok, t_base, t_new, t_wait = true, now, now, 0.0
if r_int > 0 then r_ok, r_base, r_new, r_wait = step(load(KEYS[1]), 1, r_int, r_cap) end
if t_int > 0 then t_ok, t_base, t_new, t_wait = step(load(KEYS[2]), cost, t_int, t_cap) end
local r_rem, t_rem = -1, -1
if r_ok and t_ok then
  if r_int > 0 then store(KEYS[1], r_new); r_rem = remaining(r_new, r_int, r_cap) end
  if t_int > 0 then store(KEYS[2], t_new); t_rem = remaining(t_new, t_int, t_cap) end
  return {1, '0', '', r_rem, t_rem, fmt(now)}
end
local kind = 'tokens'
if r_wait >= t_wait then kind = 'requests' end
local wait = r_wait
if t_wait > wait then wait = t_wait end
if r_int > 0 then r_rem = remaining(r_base, r_int, r_cap) end
if t_int > 0 then t_rem = remaining(t_base, t_int, t_cap) end
return {0, fmt(wait), kind, r_rem, t_rem, fmt(now)}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisRateLimiter:
    """GCRA in Redis, shared by every replica that points at the same server.

    ``client`` is a ``redis.asyncio.Redis``; :meth:`from_url` builds one with short timeouts
    and no retry backoff, which is what a limiter on the request path wants.  ``clock`` is
    for tests only: None (the default) uses the Redis server's clock, which is what makes
    replicas agree; a callable supplies ``now`` in seconds since :data:`EPOCH_S`.
    """

    def __init__(
        self,
        client: Any,
        limits: Limits | LimitsLookup,
        *,
        fail_open: bool = True,
        key_prefix: str = "lf:rl:",
        fail_closed_retry_after_s: float = 1.0,
        warn_every_s: float = 10.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self._lookup = _as_lookup(limits)
        self.fail_open = fail_open
        self._prefix = key_prefix
        self._closed_retry = fail_closed_retry_after_s
        self._warn_every = warn_every_s
        self._last_warn = -math.inf
        self._clock = clock
        self._script = client.register_script(GCRA_LUA)  # EVALSHA, SCRIPT LOAD on NOSCRIPT
        #: Calls that failed to reach a verdict from Redis (for metrics).
        self.backend_failures = 0
        #: Redis server time (s since EPOCH_S) of the last successful call; for tests/diagnostics.
        self.last_server_now: float | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        limits: Limits | LimitsLookup,
        *,
        timeout_s: float = 0.25,
        max_connections: int = 64,
        **kwargs: Any,
    ) -> RedisRateLimiter:
        """A limiter with its own connection pool: ``timeout_s`` bounds connect and each reply."""
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),  # one immediate reconnect (stale pooled socket), no sleeping
            max_connections=max_connections,
        )
        return cls(client, limits, **kwargs)

    def keys(self, tenant: str) -> tuple[str, str]:
        """The tenant's request and token cells; the ``{tenant}`` hash tag keeps them in one slot."""
        return f"{self._prefix}{{{tenant}}}:r", f"{self._prefix}{{{tenant}}}:t"

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    async def acquire(self, tenant: str, tokens: int = 0) -> Decision:
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        limits = self._lookup(tenant)
        if limits.unlimited:
            return _UNLIMITED
        args = (
            "a",
            repr(limits.request_interval),
            limits.request_capacity,
            repr(limits.token_interval),
            limits.token_capacity,
            tokens,
            self._now_arg(),
        )
        try:
            reply = await self._script(keys=self.keys(tenant), args=args)
        except Exception as exc:  # any backend failure: the policy decides, never a 500
            return self._degraded(tenant, exc, limits)
        allowed, wait, kind, r_rem, t_rem, now = reply
        self.last_server_now = float(_text(now))
        remaining = Remaining(None if int(r_rem) < 0 else int(r_rem), None if int(t_rem) < 0 else int(t_rem))
        if int(allowed):
            return Decision(True, 0.0, None, remaining, limits)
        limit_kind: LimitKind = "requests" if _text(kind) == "requests" else "tokens"
        return Decision(False, float(_text(wait)), limit_kind, remaining, limits)

    async def reconcile(self, tenant: str, estimated: int, actual: int) -> None:
        """Best effort: if Redis is down the difference is lost (and a warning logged)."""
        limits = self._lookup(tenant)
        delta = actual - estimated
        if not limits.tokens_per_min or delta == 0:
            return
        args = ("c", "0", 0, repr(limits.token_interval), limits.token_capacity, delta, self._now_arg())
        try:
            reply = await self._script(keys=self.keys(tenant), args=args)
        except Exception as exc:
            self._record_failure(tenant, exc)
            return
        self.last_server_now = float(_text(reply[0]))

    async def aclose(self) -> None:
        await self._client.aclose()

    def _record_failure(self, tenant: str, exc: BaseException) -> None:
        self.backend_failures += 1
        mono = time.monotonic()
        if mono - self._last_warn >= self._warn_every:
            self._last_warn = mono
            policy = "admitting (fail-open)" if self.fail_open else "refusing (fail-closed)"
            log.warning(
                "rate limiter: Redis unavailable (%s: %s); %s requests until it answers "
                "(tenant %r; %d failures so far; next warning in %.0fs at the earliest)",
                type(exc).__name__,
                exc,
                policy,
                tenant,
                self.backend_failures,
                self._warn_every,
            )

    def _degraded(self, tenant: str, exc: BaseException, limits: Limits) -> Decision:
        self._record_failure(tenant, exc)
        if self.fail_open:
            return Decision(True, 0.0, None, Remaining(), limits, degraded=True)
        return Decision(False, self._closed_retry, "unavailable", Remaining(), limits, degraded=True)
