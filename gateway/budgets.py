"""Cost accounting on the request path: prices in force, the tenant's baseline, and budget holds.

What it is responsible for:
- following the compacted `price-lists` and `budgets` topics into a `PriceBook` and a
  `BudgetBook` (`Accounting.follow`), so every replica prices and caps calls alike;
- the baseline price of a tenant (configured per tenant; by default the dearest model), so
  each charge records what the call would have cost there and the savings;
- holding the most a call can cost against every budget that applies before the model is
  called, settling the actual cost after, releasing the hold on failure, and the facts that
  record it (BudgetReserved / BudgetSettled / BudgetReleased / BudgetThresholdCrossed),
  published in the request's own Kafka transactions (`Accounting.facts_for`).

Two ledgers with the same arithmetic (`domain.budget`): `LocalBudgetLedger` in process (one
replica), `RedisBudgetLedger` for several replicas, where one Lua script (`BUDGET_LUA`) checks
and updates every counter of a hold atomically. Money travels to Redis as two exact integers
(whole units, picounits), never as a float.

Counters start "uninitialised": before the first hold on a budget in a period, the spend of
that period is restored from the log (the BudgetSettled facts on `budget-holds`), so a lost
Redis (or a restarted single replica) never forgets what was spent. The same restore runs on
a schedule (`reconcile_forever`); it only ever raises a counter (see `domain.budget.restore`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from domain.budget import (
    Budget,
    BudgetBook,
    BudgetCounter,
    Line,
    from_pico,
    next_reset,
    period_start,
    release,
    reserve,
    restore,
    settle,
    to_pico,
)
from domain.pricing import Price, PriceBook, cost, strongest
from gateway.adapters import Completion
from gateway.models import Message
from streams.events import (
    BudgetReleased,
    BudgetReserved,
    BudgetSet,
    BudgetSettled,
    BudgetThresholdCrossed,
    Envelope,
    Event,
    PriceListPublished,
    RequestReceived,
    TokensCharged,
)
from streams.follower import StateFollower
from streams.ids import derived_uuid7
from streams.topics import Topics

if TYPE_CHECKING:
    from ledgerflow.settings import Settings

log = logging.getLogger(__name__)

PRODUCER = "gateway"
DEFAULT_HOLD_TTL_S = 300.0  # a hold nothing closed (a crashed replica) returns to the budget after this


def prompt_bound(messages: Sequence[Message]) -> int:
    """An upper bound of a prompt's tokens: its UTF-8 bytes plus 4 per message and 3 to prime the reply.

    Why bytes: every token of a byte-level BPE tokenizer covers at least one byte, so this
    bounds any such model's count (about 4x the usual count: holds are generous, never short).
    """
    return sum(len(m.content.encode()) for m in messages) + 4 * len(messages) + 3


# --- ledgers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReserveOutcome:
    status: str  # ok | duplicate | refused | uninitialised
    index: int = -1  # the refusing (or uninitialised) line
    left: int = 0  # picounits left on the refusing line


@dataclass(frozen=True)
class CounterAfter:
    """A counter right after a settle: what BudgetThresholdCrossed reports."""

    spent: int
    held: int
    crossed: tuple[int, ...]


class BudgetLedger(Protocol):
    async def reserve(
        self, tenant: str, rid: str, counters: Sequence[str], lines: Sequence[Line], amount: int, now: float,
        expires: float,
    ) -> ReserveOutcome: ...  # fmt: skip

    async def settle(
        self, tenant: str, rid: str, counters: Sequence[str], lines: Sequence[Line], actual: int
    ) -> list[CounterAfter]: ...

    async def release(self, tenant: str, rid: str, counters: Sequence[str]) -> None: ...

    async def restore(self, tenant: str, counter: str, spent: int, ttl_s: float | None) -> None: ...

    async def read(self, tenant: str, counter: str) -> BudgetCounter: ...

    async def aclose(self) -> None: ...


@dataclass
class _LocalHold:
    amount: int
    counters: tuple[tuple[str, str], ...]  # (tenant, counter)
    expires: float
    open: bool = True
    lapsed: bool = False  # released by expiry: a late settle still spends, without returning it twice


class LocalBudgetLedger:
    """The hold arithmetic in this process: exact for one replica (N replicas would each allow the budget).

    Safe within one event loop: no await between reading and writing a counter. Counters are
    keyed by (tenant, counter) and holds by (tenant, request id), as the Redis ledger's keys are:
    two tenants may choose the same budget_id (or request id).
    """

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], BudgetCounter] = {}
        self._holds: dict[tuple[str, str], _LocalHold] = {}  # (tenant, request id)

    def _sweep(self, now: float) -> None:
        for key, h in list(self._holds.items()):
            if h.open and h.expires <= now:
                release([self._counters[c] for c in h.counters if c in self._counters], h.amount)
                h.open, h.lapsed = False, True
            if not h.open and h.expires + 3600 <= now:
                del self._holds[key]

    async def reserve(
        self, tenant: str, rid: str, counters: Sequence[str], lines: Sequence[Line], amount: int, now: float,
        expires: float,
    ) -> ReserveOutcome:  # fmt: skip
        self._sweep(now)
        keys = [(tenant, k) for k in counters]
        for i, key in enumerate(keys):
            c = self._counters.get(key)
            if c is None or not c.initialised:
                return ReserveOutcome("uninitialised", i)
        if (tenant, rid) in self._holds:
            return ReserveOutcome("duplicate")
        refusal = reserve([self._counters[k] for k in keys], lines, amount)
        if refusal is not None:
            return ReserveOutcome("refused", refusal.index, refusal.left)
        self._holds[(tenant, rid)] = _LocalHold(amount, tuple(keys), expires)
        return ReserveOutcome("ok")

    async def settle(
        self, tenant: str, rid: str, counters: Sequence[str], lines: Sequence[Line], actual: int
    ) -> list[CounterAfter]:
        hold = self._holds.get((tenant, rid))
        if hold is not None and not hold.open and not hold.lapsed:
            return []  # already closed: settling twice must not spend twice
        cs = [self._counters.setdefault((tenant, k), BudgetCounter()) for k in counters]
        crossed = settle(cs, lines, hold.amount if hold is not None and hold.open else None, actual)
        if hold is not None:
            hold.open, hold.lapsed = False, False
        return [CounterAfter(c.spent, c.held, tuple(x)) for c, x in zip(cs, crossed, strict=True)]

    async def release(self, tenant: str, rid: str, counters: Sequence[str]) -> None:
        hold = self._holds.get((tenant, rid))
        if hold is None or not hold.open:
            return
        release([self._counters.setdefault((tenant, k), BudgetCounter()) for k in counters], hold.amount)
        hold.open = False

    async def restore(self, tenant: str, counter: str, spent: int, ttl_s: float | None) -> None:
        restore(self._counters.setdefault((tenant, counter), BudgetCounter()), spent)

    async def read(self, tenant: str, counter: str) -> BudgetCounter:
        c = self._counters.get((tenant, counter), BudgetCounter())
        return BudgetCounter(c.spent, c.held, set(c.alerted), c.initialised)

    async def aclose(self) -> None:
        self._counters.clear()
        self._holds.clear()


BUDGET_LUA = """
-- ledgerflow budget holds: every counter of one hold checked and updated atomically.
-- Mirrors domain/budget.py reserve / settle / release / restore op for op.
-- Money is two exact integers per amount: whole units (u) and picounits (p, 0 <= p < 1e12);
-- doubles hold both exactly (u < 2^53), so no amount is ever rounded.
-- KEYS[1] open holds (zset: score = expiry)  KEYS[2] this hold (hash)  KEYS[3..] counters (hash)
-- ARGV[1] op: r reserve | s settle | x release | i restore
-- r: ARGV[2] rid, [3] now, [4] expires, [5] amount u, [6] amount p, [7] hold key prefix,
--    then per counter: limit u, limit p, enforced 0|1, thresholds csv
-- s: ARGV[2] rid, [3] actual u, [4] actual p, [5] closed-hold ttl ms, then per counter as in r
-- x: ARGV[2] rid, [3] closed-hold ttl ms
-- i: KEYS[3] the counter; ARGV[2] spent u, [3] spent p, [4] counter ttl ms (0 = none)
local PICO = 1000000000000
local function fmt(x) return string.format('%.0f', x) end
local function num(v) if v then return tonumber(v) end return 0 end
local function get(key, f) return num(redis.call('HGET', key, f .. 'u')), num(redis.call('HGET', key, f .. 'p')) end
local function put(key, f, u, p) redis.call('HSET', key, f .. 'u', fmt(u), f .. 'p', fmt(p)) end
local function add(au, ap, bu, bp)
  local u, p = au + bu, ap + bp
  if p >= PICO then p = p - PICO; u = u + 1 end
  return u, p
end
local function sub0(au, ap, bu, bp)
  local u, p = au - bu, ap - bp
  if p < 0 then p = p + PICO; u = u - 1 end
  if u < 0 then return 0, 0 end
  return u, p
end
local function le(au, ap, bu, bp) return au < bu or (au == bu and ap <= bp) end
local function mul(au, ap, k)
  local t = ap * k
  local carry = math.floor(t / PICO)
  return au * k + carry, t - carry * PICO
end
local function close_hold(hkey, ttl)
  redis.call('HSET', hkey, 'open', '0')
  redis.call('PEXPIRE', hkey, ttl)
end
local function release_hold(hkey)
  local au, ap = get(hkey, 'a')
  local cs = redis.call('HGET', hkey, 'counters')
  if cs then
    for c in string.gmatch(cs, '[^\\n]+') do
      local hu, hp = get(c, 'h')
      hu, hp = sub0(hu, hp, au, ap)
      if redis.call('EXISTS', c) == 1 then put(c, 'h', hu, hp) end
    end
  end
end
local op = ARGV[1]
local n = #KEYS - 2

if op == 'i' then
  local c = KEYS[3]
  local su, sp = get(c, 's')
  if not le(tonumber(ARGV[2]), tonumber(ARGV[3]), su, sp) then put(c, 's', tonumber(ARGV[2]), tonumber(ARGV[3])) end
  redis.call('HSET', c, 'init', '1')
  if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', c, ARGV[4]) end
  return {'ok'}
end

if op == 'r' then
  local now = tonumber(ARGV[3])
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, old in ipairs(expired) do
    local hkey = ARGV[7] .. old
    if redis.call('HGET', hkey, 'open') == '1' then
      release_hold(hkey)
      redis.call('HSET', hkey, 'open', 'e')  -- lapsed: a late settle still spends, without returning it twice
      redis.call('PEXPIRE', hkey, 3600000)
    end
    redis.call('ZREM', KEYS[1], old)
  end
  for i = 1, n do
    if redis.call('HGET', KEYS[2 + i], 'init') ~= '1' then return {'uninitialised', tostring(i - 1)} end
  end
  if redis.call('EXISTS', KEYS[2]) == 1 then return {'duplicate'} end
  local au, ap = tonumber(ARGV[5]), tonumber(ARGV[6])
  for i = 1, n do
    local b = 7 + (i - 1) * 4
    if ARGV[b + 3] == '1' then
      local c = KEYS[2 + i]
      local su, sp = get(c, 's')
      local hu, hp = get(c, 'h')
      local tu, tp = add(su, sp, hu, hp)
      tu, tp = add(tu, tp, au, ap)
      local lu, lp = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
      if not le(tu, tp, lu, lp) then
        local cu, cp = add(su, sp, hu, hp)
        local leftu, leftp = sub0(lu, lp, cu, cp)
        return {'refused', tostring(i - 1), fmt(leftu), fmt(leftp)}
      end
    end
  end
  local names = {}
  for i = 1, n do
    local c = KEYS[2 + i]
    local hu, hp = get(c, 'h')
    hu, hp = add(hu, hp, au, ap)
    put(c, 'h', hu, hp)
    names[i] = c
  end
  put(KEYS[2], 'a', au, ap)
  redis.call('HSET', KEYS[2], 'open', '1', 'counters', table.concat(names, '\\n'))
  redis.call('PEXPIRE', KEYS[2], math.ceil((tonumber(ARGV[4]) - now) * 1000) + 3600000)
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
  return {'ok'}
end

local state = redis.call('HGET', KEYS[2], 'open')
if state == '0' then return {'duplicate'} end

if op == 'x' then
  if state == '1' then release_hold(KEYS[2]) end
  close_hold(KEYS[2], tonumber(ARGV[3]))
  redis.call('ZREM', KEYS[1], ARGV[2])
  return {'ok'}
end

-- settle: the held amount comes back (if the hold is still open), the actual is spent
local au, ap = get(KEYS[2], 'a')
local xu, xp = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {'ok'}
for i = 1, n do
  local c = KEYS[2 + i]
  local b = 5 + (i - 1) * 4
  local su, sp = get(c, 's')
  local hu, hp = get(c, 'h')
  if state == '1' then hu, hp = sub0(hu, hp, au, ap) end
  su, sp = add(su, sp, xu, xp)
  put(c, 's', su, sp)
  put(c, 'h', hu, hp)
  local lu, lp = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local crossed = {}
  if lu > 0 or lp > 0 then
    for pct in string.gmatch(ARGV[b + 4], '[^,]+') do
      local f = 't' .. pct
      if redis.call('HEXISTS', c, f) == 0 then
        local s100u, s100p = mul(su, sp, 100)
        local lku, lkp = mul(lu, lp, tonumber(pct))
        if le(lku, lkp, s100u, s100p) then
          redis.call('HSET', c, f, '1')
          crossed[#crossed + 1] = pct
        end
      end
    end
  end
  out[#out + 1] = fmt(su)
  out[#out + 1] = fmt(sp)
  out[#out + 1] = fmt(hu)
  out[#out + 1] = fmt(hp)
  out[#out + 1] = table.concat(crossed, ',')
end
close_hold(KEYS[2], tonumber(ARGV[5]))
redis.call('ZREM', KEYS[1], ARGV[2])
return out
"""


def _split(amount: int) -> tuple[str, str]:
    return str(amount // 10**12), str(amount % 10**12)


def _join(u: Any, p: Any) -> int:
    return int(_text(u)) * 10**12 + int(_text(p))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _line_args(lines: Sequence[Line]) -> list[str]:
    out: list[str] = []
    for line in lines:
        out.extend((*_split(line.limit), "1" if line.enforced else "0", ",".join(map(str, line.thresholds))))
    return out


class RedisBudgetLedger:
    """The hold arithmetic in Redis, shared by every replica that points at the same server.

    All keys of a tenant carry the hash tag `{tenant}`, so one script touches one slot.
    """

    CLOSED_TTL_MS = 24 * 3600 * 1000  # a closed hold is remembered a day, so a repeated settle is a no-op

    def __init__(self, client: Any, *, key_prefix: str = "lf:bud:") -> None:
        self._client = client
        self._prefix = key_prefix
        self._script = client.register_script(BUDGET_LUA)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 0.5, max_connections: int = 64, **kw: Any) -> RedisBudgetLedger:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            max_connections=max_connections,
        )
        return cls(client, **kw)

    def _holds(self, tenant: str) -> str:
        return f"{self._prefix}{{{tenant}}}:holds"

    def _hold_prefix(self, tenant: str) -> str:
        return f"{self._prefix}{{{tenant}}}:hold:"

    def counter_key(self, tenant: str, counter: str) -> str:
        return f"{self._prefix}{{{tenant}}}:c:{counter}"

    def _keys(self, tenant: str, rid: str, counters: Sequence[str]) -> list[str]:
        return [self._holds(tenant), self._hold_prefix(tenant) + rid, *(self.counter_key(tenant, c) for c in counters)]

    async def reserve(
        self, tenant: str, rid: str, counters: Sequence[str], lines: Sequence[Line], amount: int, now: float,
        expires: float,
    ) -> ReserveOutcome:  # fmt: skip
        args = ["r", rid, repr(now), repr(expires), *_split(amount), self._hold_prefix(tenant), *_line_args(lines)]
        reply = [_text(x) for x in await self._script(keys=self._keys(tenant, rid, counters), args=args)]
        if reply[0] == "refused":
            return ReserveOutcome("refused", int(reply[1]), _join(reply[2], reply[3]))
        if reply[0] == "uninitialised":
            return ReserveOutcome("uninitialised", int(reply[1]))
        return ReserveOutcome(reply[0])

    async def settle(
        self, tenant: str, rid: str, counters: Sequence[str], lines: Sequence[Line], actual: int
    ) -> list[CounterAfter]:
        args = ["s", rid, *_split(actual), str(self.CLOSED_TTL_MS), *_line_args(lines)]
        reply = [_text(x) for x in await self._script(keys=self._keys(tenant, rid, counters), args=args)]
        if reply[0] == "duplicate":
            return []
        out = []
        for i in range(len(counters)):
            su, sp, hu, hp, crossed = reply[1 + 5 * i : 6 + 5 * i]
            out.append(CounterAfter(_join(su, sp), _join(hu, hp), tuple(int(x) for x in crossed.split(",") if x)))
        return out

    async def release(self, tenant: str, rid: str, counters: Sequence[str]) -> None:
        args = ["x", rid, str(self.CLOSED_TTL_MS)]
        await self._script(keys=self._keys(tenant, rid, counters), args=args)

    async def restore(self, tenant: str, counter: str, spent: int, ttl_s: float | None) -> None:
        ttl_ms = 0 if ttl_s is None else max(1, math.ceil(ttl_s * 1000))
        keys = [self._holds(tenant), self._hold_prefix(tenant) + "-", self.counter_key(tenant, counter)]
        await self._script(keys=keys, args=["i", *_split(spent), str(ttl_ms)])

    async def read(self, tenant: str, counter: str) -> BudgetCounter:
        raw = {_text(k): _text(v) for k, v in (await self._client.hgetall(self.counter_key(tenant, counter))).items()}
        spent = _join(raw.get("su", "0"), raw.get("sp", "0"))
        held = _join(raw.get("hu", "0"), raw.get("hp", "0"))
        alerted = {int(k[1:]) for k in raw if k.startswith("t") and k[1:].isdigit()}
        return BudgetCounter(spent, held, alerted, raw.get("init") == "1")

    async def aclose(self) -> None:
        await self._client.aclose()


# --- the accounting of one call ---------------------------------------------------------------


@dataclass
class Hold:
    """A call's hold on its budgets, and after the settle what each counter reached."""

    request_id: str
    tenant: str
    at: datetime
    trace_parent: str | None
    price: Price
    amount: Decimal
    budgets: tuple[Budget, ...]
    period_starts: tuple[datetime, ...]
    counters: tuple[str, ...]
    lines: tuple[Line, ...]
    expires_at: datetime
    settled: list[CounterAfter] | None = None
    actual: Decimal | None = None

    @property
    def reservation_id(self) -> str:
        return f"hold-{self.request_id}"

    def envelope(self, event_type: str, *parts: str) -> Envelope:
        return Envelope(
            event_id=str(derived_uuid7(self.request_id, event_type, *parts)),
            event_type=event_type,
            schema_version=1,
            tenant=self.tenant,
            occurred_at=self.at,
            correlation_id=self.request_id,
            trace_parent=self.trace_parent,
            producer=PRODUCER,
        )

    def _common(self, i: int) -> dict[str, Any]:
        b = self.budgets[i]
        return {
            "budget_id": b.budget_id,
            "scope": b.scope,
            "scope_id": b.scope_id,
            "period": b.period,
            "period_start": self.period_starts[i],
            "reservation_id": self.reservation_id,
            "request_id": self.request_id,
            "currency": b.currency,
        }

    def reserved_facts(self) -> list[Event]:
        return [
            BudgetReserved(
                envelope=self.envelope("BudgetReserved", b.budget_id),
                amount=self.amount,
                expires_at=self.expires_at,
                **self._common(i),
            )
            for i, b in enumerate(self.budgets)
        ]

    def settled_facts(self) -> list[Event]:
        if self.settled is None or self.actual is None:
            return []
        out: list[Event] = []
        for i, b in enumerate(self.budgets):
            out.append(
                BudgetSettled(
                    envelope=self.envelope("BudgetSettled", b.budget_id),
                    reserved_amount=self.amount,
                    actual_amount=self.actual,
                    limit_amount=b.limit,  # what the month-end forecast compares with (agents/forecast.py)
                    enforced=b.enforced,
                    **self._common(i),
                )
            )
            after = self.settled[i] if i < len(self.settled) else None
            for pct in after.crossed if after is not None else ():
                common = self._common(i)
                del common["request_id"]
                out.append(
                    BudgetThresholdCrossed(
                        envelope=self.envelope("BudgetThresholdCrossed", b.budget_id, str(pct)),
                        threshold_pct=pct,
                        limit_amount=b.limit,
                        spent_amount=from_pico(after.spent) if after else Decimal(0),
                        reserved_amount=from_pico(after.held) if after else Decimal(0),
                        **common,
                    )
                )
        return out

    def released_facts(self, reason: str) -> list[Event]:
        return [
            *self.reserved_facts(),
            *(
                BudgetReleased(
                    envelope=self.envelope("BudgetReleased", b.budget_id),
                    amount=self.amount,
                    reason=reason,
                    **self._common(i),
                )
                for i, b in enumerate(self.budgets)
            ),
        ]


@dataclass(frozen=True)
class BudgetExhausted:
    """Why a call was refused: which budget, what is left, when it resets (the 402's message)."""

    budget: Budget
    left: Decimal
    needed: Decimal
    resets_at: datetime | None

    @property
    def message(self) -> str:
        b = self.budget
        resets = f"it resets at {self.resets_at.isoformat()}" if self.resets_at else "it never resets (total)"
        return (
            f"{b.describe()} is exhausted: {show(self.left)} {b.currency} left of {show(b.limit)} {b.currency}, "
            f"and this call may cost up to {show(self.needed)} {b.currency}; {resets}. Send a lower max_tokens "
            "or a shorter prompt, or ask for a higher budget"
        )


def show(amount: Decimal) -> str:
    """Money for people: no exponent, no trailing zeros past the cents (exact: nothing is rounded)."""
    trimmed = amount.normalize()
    if trimmed.as_tuple().exponent > -2:  # type: ignore[operator]
        trimmed = amount.quantize(Decimal("0.01"))
    return f"{trimmed:f}"


class BudgetUnavailable(RuntimeError):
    """The budget ledger could not be reached and budgets fail closed."""


SpendSource = Callable[[Sequence[tuple[Budget, datetime]]], Mapping[tuple[str, datetime], Decimal]]


def counter_name(budget: Budget, start: datetime) -> str:
    return f"{budget.budget_id}:{int(start.timestamp())}"


@dataclass
class Accounting:
    """One replica's accounting state: prices, baselines, budgets, and the ledger holding against them."""

    prices: PriceBook
    ledger: BudgetLedger = field(default_factory=LocalBudgetLedger)
    budgets: BudgetBook = field(default_factory=BudgetBook)
    baseline_default: str | None = None  # None: the dearest model in force
    baseline_by_tenant: Mapping[str, str] = field(default_factory=dict)
    spend_source: SpendSource | None = None  # the log's settled spend per (budget, period); None: start at 0
    hold_ttl_s: float = DEFAULT_HOLD_TTL_S
    fail_open: bool = False
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    follower: StateFollower | None = None
    ledger_failures: int = 0
    _restore_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _restored_at: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _reconciler: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    # --- state from the log

    def apply(self, event: Event) -> None:
        if isinstance(event, PriceListPublished):
            self.prices.apply(event)
        elif isinstance(event, BudgetSet):
            self.budgets.apply(event)

    def follow(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.follower = StateFollower(bootstrap, list(topics), self.apply, name="accounting")

    def start(self) -> None:
        if self.follower is not None:
            self.follower.start()

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()

    async def astart(self, reconcile_every_s: float | None = None) -> None:
        """Follow the topics and, when asked, restore the counters from the log every `reconcile_every_s`."""
        self.start()
        if reconcile_every_s:
            self._reconciler = asyncio.create_task(self.reconcile_forever(reconcile_every_s))

    async def aclose(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
        await asyncio.to_thread(self.close)
        await self.ledger.aclose()

    @property
    def loaded(self) -> bool:
        return self.follower is None or self.follower.loaded.is_set()

    def gate(self, check: Callable[[], Awaitable[tuple[bool, str]]]) -> Callable[[], Awaitable[tuple[bool, str]]]:
        """A readiness check that also waits for prices and budgets to be loaded (a replica that does
        not know a budget yet must not admit calls against it)."""

        async def ready() -> tuple[bool, str]:
            ok, detail = await check()  # the broker's own state first: it says more when Kafka is down
            if ok and not self.loaded:
                return False, "prices and budgets not loaded yet from the price-lists and budgets topics"
            return ok, detail

        return ready

    # --- per call

    def baseline(self, tenant: str) -> Price | None:
        """The tenant's baseline price in force: its configured model, else the default, else the dearest."""
        model = self.baseline_by_tenant.get(tenant) or self.baseline_default or strongest(self.prices)
        return self.prices.get(model) if model else None

    async def hold(
        self,
        tenant: str,
        key_id: str,
        request_id: str,
        at: datetime,
        trace_parent: str | None,
        price: Price,
        messages: Sequence[Message],
        max_tokens: int,
    ) -> Hold | BudgetExhausted | None:
        """Hold the most this call can cost on every budget that applies; None if none applies."""
        budgets = tuple(self.budgets.applicable(tenant, key_id))
        if not budgets:
            return None
        amount = cost(prompt_bound(messages), max_tokens, price)
        for b in budgets:
            if b.currency != price.currency:
                return BudgetExhausted(b, Decimal(0), amount, next_reset(b.period, at))
        starts = tuple(period_start(b.period, at) for b in budgets)
        h = Hold(
            request_id=request_id,
            tenant=tenant,
            at=at,
            trace_parent=trace_parent,
            price=price,
            amount=amount,
            budgets=budgets,
            period_starts=starts,
            counters=tuple(counter_name(b, s) for b, s in zip(budgets, starts, strict=True)),
            lines=tuple(Line(to_pico(b.limit), b.enforced, b.thresholds) for b in budgets),
            expires_at=at + timedelta(seconds=self.hold_ttl_s),
        )
        for _ in range(3):
            try:
                out = await self.ledger.reserve(
                    tenant, h.reservation_id, h.counters, h.lines, to_pico(amount), time.time(),
                    time.time() + self.hold_ttl_s,
                )  # fmt: skip
            except Exception as exc:
                self._unavailable(exc)
                return None
            if out.status in ("ok", "duplicate"):
                return h
            if out.status == "refused":
                b = budgets[out.index]
                return BudgetExhausted(b, from_pico(out.left), amount, next_reset(b.period, at))
            try:
                await self._restore_once(list(zip(budgets, starts, strict=True)), seen_at=time.monotonic())
            except Exception as exc:
                self._unavailable(exc)
                return None
        raise BudgetUnavailable("budget counters could not be restored from the log")

    async def _restore_once(self, budget_periods: Sequence[tuple[Budget, datetime]], seen_at: float) -> None:
        """Restore, unless another call restored these counters after this one found them uninitialised.

        Single flight: a burst of first calls in a period (or after Redis was lost) reads the log
        once, not once per call.
        """
        async with self._restore_lock:
            names = [counter_name(b, s) for b, s in budget_periods]
            if all(self._restored_at.get(n, -math.inf) > seen_at for n in names):
                return
            await self.restore(budget_periods)

    def _unavailable(self, exc: Exception) -> None:
        self.ledger_failures += 1
        log.warning("budget ledger unavailable (%s: %s)", type(exc).__name__, exc)
        if self.fail_open:
            return None
        raise BudgetUnavailable(str(exc)) from exc

    async def settle(self, hold: Hold, completion: Completion) -> None:
        """Spend the actual cost (at the price the call was held at) and return the rest of the hold."""
        hold.actual = cost(completion.prompt_tokens, completion.completion_tokens, hold.price)
        try:
            hold.settled = await self.ledger.settle(
                hold.tenant, hold.reservation_id, hold.counters, hold.lines, to_pico(hold.actual)
            )
        except Exception as exc:  # the hold lapses; the scheduled restore brings the spend back from the log
            self.ledger_failures += 1
            hold.settled = []
            log.warning("request %s: budget settle failed (%s); restored from the log later", hold.request_id, exc)

    async def release(self, hold: Hold, reason: str, publish: Callable[[list[Event]], Awaitable[None]]) -> None:
        """Return a hold whose call failed before anything was recorded, and record that (best effort)."""
        try:
            await self.ledger.release(hold.tenant, hold.reservation_id, hold.counters)
        except Exception as exc:  # the hold lapses by itself after hold_ttl_s
            self.ledger_failures += 1
            log.warning("request %s: budget release failed (%s); the hold lapses", hold.request_id, exc)
        try:
            await publish(hold.released_facts(reason))
        except Exception as exc:
            log.warning("request %s: budget release not recorded: %s", hold.request_id, exc)

    @staticmethod
    def facts_for(hold: Hold | None, events: Sequence[Event]) -> list[Event]:
        """`events` plus the budget facts that belong in the same transaction: the hold with the
        opening facts (RequestReceived), its settle and thresholds with the charge (TokensCharged)."""
        out = list(events)
        if hold is None:
            return out
        if any(isinstance(e, RequestReceived) for e in events):
            out.extend(hold.reserved_facts())
        if any(isinstance(e, TokensCharged) for e in events):
            out.extend(hold.settled_facts())
        return out

    # --- reconciliation with the log

    async def restore(self, budget_periods: Sequence[tuple[Budget, datetime]]) -> None:
        """Raise these counters to the spend the log records for them, and mark them initialised."""
        spend: Mapping[tuple[str, datetime], Decimal] = {}
        if self.spend_source is not None:
            spend = await asyncio.to_thread(self.spend_source, budget_periods)
        now = self.clock()
        for b, start in budget_periods:
            reset = next_reset(b.period, start)
            ttl = None if reset is None else max(60.0, (reset - now).total_seconds() + 86400)
            amount = spend.get((b.budget_id, start), Decimal(0))
            await self.ledger.restore(b.tenant, counter_name(b, start), to_pico(amount), ttl)
            self._restored_at[counter_name(b, start)] = time.monotonic()

    async def reconcile_once(self) -> None:
        """Restore every budget's current period from the log (the scheduled reconciliation)."""
        now = self.clock()
        await self.restore([(b, period_start(b.period, now)) for b in self.budgets.all()])

    async def reconcile_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reconcile_once()
            except Exception as exc:  # the next round tries again
                log.warning("budget reconciliation failed: %s", exc)


def kafka_spend_source(bootstrap: str, topic: str, timeout: float = 30.0) -> SpendSource:
    """Settled spend per (budget, period) from the BudgetSettled facts on `topic`.

    Reads from the earliest period start asked for (an hour early, for clock skew between
    replicas and the broker; `offsets_for_times` on the record timestamps) to the end offsets
    seen now, so a monthly restore reads one month of holds, not the topic's whole history.
    """
    from streams.codec import Codec, PoisonEvent

    codec = Codec()

    def spend(periods: Sequence[tuple[Budget, datetime]]) -> Mapping[tuple[str, datetime], Decimal]:
        wanted = {(b.budget_id, s) for b, s in periods}
        if not wanted:
            return {}
        since = min(s for _, s in periods) - timedelta(hours=1)
        out: dict[tuple[str, datetime], Decimal] = {}
        seen: set[str] = set()
        for value in read_since(bootstrap, topic, since, timeout):
            try:
                event = codec.decode(value)
            except PoisonEvent:
                continue
            if not isinstance(event, BudgetSettled) or event.envelope.event_id in seen:
                continue
            seen.add(event.envelope.event_id)  # a re-sent transaction repeats ids: count each settle once
            key = (event.budget_id, event.period_start)
            if key in wanted:
                out[key] = out.get(key, Decimal(0)) + event.actual_amount
        return out

    return spend


def read_since(bootstrap: str, topic: str, since: datetime, timeout: float) -> list[bytes]:
    """Values of the committed records of `topic` timestamped at or after `since`, up to the end offsets seen
    now; TimeoutError if the end is not reached in time (a restore must never take a prefix for the whole)."""
    from confluent_kafka import TopicPartition

    from streams.clients import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"ledgerflow-budget-restore-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=timeout)
        parts = sorted(md.topics[topic].partitions) if topic in md.topics else []
        ms = max(0, int(since.timestamp() * 1000))
        starts = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in parts], timeout=timeout)
        ends: dict[int, int] = {}
        assign = []
        for tp in starts:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=timeout)
            if tp.offset >= 0 and high > tp.offset:
                ends[tp.partition] = high
                assign.append(TopicPartition(topic, tp.partition, tp.offset))
        if not assign:
            return []
        consumer.assign(assign)
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        pending = set(ends)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} partitions {sorted(pending)} to their end in {timeout} s")
            for msg in consumer.consume(1000, 0.2):
                value = msg.value() if msg.error() is None else None
                if value is not None:
                    out.append(value)
            for tp in consumer.position([TopicPartition(topic, p) for p in pending]):
                if tp.offset >= ends[tp.partition]:
                    pending.discard(tp.partition)
        return out
    finally:
        consumer.close()


def build_accounting(settings: Settings, prices: Mapping[str, Price], topics: Topics) -> Accounting:
    """The replica's accounting: prices seeded from the registry then followed, budgets followed, the ledger
    in Redis when replicas share one (else in process), restores from the budget-holds topic."""
    ledger: BudgetLedger = RedisBudgetLedger.from_url(settings.redis_url) if settings.redis_url else LocalBudgetLedger()
    acc = Accounting(
        prices=PriceBook(prices),
        ledger=ledger,
        baseline_default=settings.baseline_model or None,
        baseline_by_tenant=dict(settings.baseline_by_tenant),
        spend_source=kafka_spend_source(settings.bootstrap, topics.name("budget-holds")),
        hold_ttl_s=settings.budget_hold_ttl_s,
        fail_open=settings.budget_fail_open,
    )
    acc.follow(settings.bootstrap, [topics.name("price-lists"), topics.name("budgets")])
    return acc
