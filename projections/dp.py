"""The read side of differential privacy: `POST /v1/dp/query`, `GET /v1/dp/budgets`, `GET /v1/dp/reallocation`.

The read side computes releases but never decides spending; the DP budget agent does
(agents/dp_budget.py), one budget at a time. A query goes through these steps, each with what
it guarantees:
1. scope and parse: a tenant key queries its own tenant only; the query is put in canonical
   form and named by its SHA-256 (`domain.dp.QuerySpec`).
2. cache: if that query was charged before and its release is on the log, the recorded
   release is the answer: no new noise, no new spend.
3. read the exact aggregates from the projections, contributions already clamped per privacy
   unit in SQL. Nothing is released and nothing is spent yet, so a failing read costs no budget.
4. record `DpQueryRequested` on Kafka (the fact first, as every read-side action that spends)
   and wait for the agent's decision on `dp-decisions`. A refusal is returned with what
   remains; a repeat waits for the first query's release and returns it.
5. only after a `DpQueryCharged` for this query_id: draw the noise (OpenDP, `domain.dp.release`),
   record `DpReleasePublished` (caused by the charge), and only once that is committed answer
   the client. A release is never shown that is not on the log; a charge whose release could
   not be recorded (the process died between 4 and 5) stays spent and is reported as such
   when the query is repeated, never computed a second time (a second draw would leak). If the
   client stops waiting (15 s), this process still follows the decision (up to 10 minutes) and
   records the release, so asking the same query again returns it without paying twice.

State here is a follower's fold of the three DP topics from the beginning (they are small):
the budgets (the same pure fold the agent runs over the budget log), every decision, and every
release, so budgets and cached answers survive restarts and agree with a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from domain.dp import (
    KINDS,
    MICRO,
    Aggregates,
    BadQuery,
    Budget,
    GrantRejected,
    Plan,
    QuerySpec,
    fold,
    plan,
    reallocation,
    release,
)
from projections.access import READER, AccessDenied, Reader, scoped_tenant
from streams.events import (
    DpBudgetGranted,
    DpQueryCharged,
    DpQueryRefused,
    DpQueryRequested,
    DpReleasePublished,
    Envelope,
    Event,
)
from streams.follower import StateFollower
from streams.ids import uuid7
from streams.publisher import FactPublisher, PublishFailed
from streams.topics import Topics

log = logging.getLogger(__name__)

PRODUCER = "projections:dp"
PATHS = ("/v1/dp/query", "/v1/dp/budgets", "/v1/dp/reallocation")
DECISION_TIMEOUT_S = 15.0  # how long a client waits for the agent's decision
PENDING_MAX_S = 600.0  # how long this process keeps following a decision its client gave up on
ReadRows = Callable[[str, dict[str, Any]], list[dict[str, Any]]]

# Each unit (API key) counts with its first `k` requests in the window (time order, then event
# id: deterministic), among those the query covers. Categories (models) come from the query.
_UNITS = """
SELECT t.model AS model, t.occurred_at AS occurred_at, t.cost AS cost, {extra}
       row_number() OVER (PARTITION BY r.api_key_id ORDER BY t.occurred_at, t.event_id) AS n
FROM tokens_charged AS t
INNER JOIN (SELECT request_id, any(api_key_id) AS api_key_id FROM request_received
            WHERE tenant = {{tenant:String}} GROUP BY request_id) AS r ON r.request_id = t.request_id
WHERE t.tenant = {{tenant:String}}
  AND t.occurred_at >= {{since:DateTime64(6, 'UTC')}} AND t.occurred_at < {{until:DateTime64(6, 'UTC')}}
  AND {where}
"""
_SQL = {
    "requests_per_model_per_day": f"""
SELECT model, toString(toDate(occurred_at)) AS day, count() AS requests
FROM ({_UNITS.format(extra="", where="has({models:Array(String)}, t.model)")})
WHERE n <= {{k:UInt32}} GROUP BY model, day
""",
    "mean_cost_per_request": f"""
SELECT model, count() AS requests,
       toString(sum(toInt64(floor(
           least(greatest(cost, toDecimal128(0, 12)), {{cost_max:Decimal(38, 12)}}) * 1000000)))) AS cost_micro
FROM ({_UNITS.format(extra="", where="has({models:Array(String)}, t.model) AND t.currency = {currency:String}")})
WHERE n <= {{k:UInt32}} GROUP BY model
""",
    "savings_distribution": f"""
SELECT bin, count() AS requests
FROM ({
        _UNITS.format(
            extra="arrayCount(e -> e <= t.savings, {edges:Array(Decimal(38, 12))}) AS bin,",
            where="t.savings IS NOT NULL AND t.currency = {currency:String}",
        )
    })
WHERE n <= {{k:UInt32}} GROUP BY bin
""",
}


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class DpRefused(Exception):
    """An HTTP error for a DP request: status and a JSON body naming what to do."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error", ""))
        self.status, self.body = status, body


def aggregates(spec: QuerySpec, read_rows: ReadRows) -> Aggregates:
    """The exact, clamped aggregates of `spec` from the projections (parameterised SQL)."""
    params: dict[str, Any] = {
        "tenant": spec.tenant,
        "since": spec.window_start.strftime("%Y-%m-%d %H:%M:%S"),
        "until": spec.window_end.strftime("%Y-%m-%d %H:%M:%S"),
        "k": spec.max_requests_per_unit,
        "models": list(spec.models),  # bound by the client's formatting, never spliced by hand
        "currency": spec.currency,
        "cost_max": str(spec.cost_max),
        "edges": list(spec.savings_edges),
    }
    rows = read_rows(_SQL[spec.kind], params)
    if spec.kind == "requests_per_model_per_day":
        return Aggregates(requests={f"{r['model']}|{r['day']}": int(r["requests"]) for r in rows})
    if spec.kind == "mean_cost_per_request":
        return Aggregates(
            requests={r["model"]: int(r["requests"]) for r in rows},
            cost_micro={r["model"]: int(r["cost_micro"]) for r in rows},
        )
    cells = spec.cells()
    return Aggregates(requests={cells[int(r["bin"])]: int(r["requests"]) for r in rows})


@dataclass
class _Known:
    """What the follower has seen of one query."""

    decision: DpQueryCharged | DpQueryRefused | None = None
    released: DpReleasePublished | None = None


class DpReadSide:
    """Follows the DP topics, records requests and releases, answers the HTTP endpoints."""

    def __init__(self, bootstrap: str, topics: Topics, read_rows: ReadRows, *, group: str = "ledgerflow-read") -> None:
        self._topics = topics
        self._read_rows = read_rows
        self._publisher = FactPublisher(bootstrap, f"{group}-dp-{uuid.uuid4().hex[:12]}", topics)
        self._lock = threading.Lock()
        self.budgets: dict[str, Budget] = {}
        self._known: dict[str, _Known] = {}
        self._by_sha: dict[str, str] = {}  # query_sha256 -> query_id of the charge that paid
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self.decision_timeout_s = DECISION_TIMEOUT_S
        self._tasks: set[asyncio.Future[dict[str, Any]]] = set()  # decisions still being followed through
        names = [topics.name(k) for k in ("dp-budget-log", "dp-decisions", "dp-releases")]
        self._follower = StateFollower(bootstrap, names, self._apply, name="dp")

    def start(self) -> None:
        self._publisher.start()
        self._follower.start()

    def close(self) -> None:
        self._follower.close()
        self._publisher.close()

    @property
    def loaded(self) -> bool:
        return self._follower.loaded.is_set()

    # -- the follower's fold (its thread) ----------------------------------------------------

    def _apply(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, DpBudgetGranted | DpQueryRequested):
                try:
                    state, _ = fold(self.budgets.get(event.budget_key), event)
                except GrantRejected:
                    return
                if state is not None:
                    self.budgets[event.budget_key] = state
                return
            if isinstance(event, DpQueryCharged | DpQueryRefused):
                self._known.setdefault(event.query_id, _Known()).decision = event
                if isinstance(event, DpQueryCharged):
                    self._by_sha[event.query_sha256] = event.query_id
            elif isinstance(event, DpReleasePublished):
                known = self._known.setdefault(event.query_id, _Known())
                if known.released is None:  # the first recorded release is the release
                    known.released = event
            else:
                return
            self._wake(event.query_id)

    def _wake(self, query_id: str) -> None:
        for loop, fut in self._waiters.pop(query_id, []):
            loop.call_soon_threadsafe(_settle, fut)

    async def _wait(self, query_id: str, ready: Callable[[_Known], bool], timeout: float) -> _Known:
        """Until the follower has seen what `ready` wants for `query_id` (or the timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._lock:
                known = self._known.get(query_id, _Known())
                if ready(known):
                    return known
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.setdefault(query_id, []).append((loop, fut))
            left = deadline - loop.time()
            if left <= 0:
                return known
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, left)

    # -- queries ------------------------------------------------------------------------------

    def _budget(self, tenant: str, metric_set: str) -> Budget:
        with self._lock:
            budget = self.budgets.get(f"{tenant}/{metric_set}")
        if budget is None:
            raise DpRefused(
                404,
                {"error": f"no DP budget is granted for {tenant}/{metric_set}: "
                 f"ask the operator (`ledgerflow dp grant --tenant {tenant} --metric-set {metric_set} ...`)"},
            )  # fmt: skip
        return budget

    def _answer(self, spec: QuerySpec, known: _Known, cached: bool) -> dict[str, Any]:
        rel = known.released
        assert rel is not None
        with self._lock:
            budget = self.budgets.get(f"{spec.tenant}/{spec.metric_set}")
        return {
            "query_id": rel.query_id,
            "tenant": spec.tenant,
            "metric_set": rel.metric_set,
            "kind": spec.kind,
            "since": spec.since.isoformat(),
            "until": spec.until.isoformat(),
            "mechanism": rel.mechanism,
            "cached": cached,
            "result": orjson.loads(rel.result),
            "budget": budget.summary() if budget else None,
        }

    async def query(self, reader: Reader, body: dict[str, Any]) -> dict[str, Any]:
        if not self.loaded:
            raise DpRefused(503, {"error": "the DP state is loading from Kafka; retry shortly"})
        tenant = scoped_tenant(reader, body.get("tenant"))
        if tenant is None:
            raise DpRefused(400, {"error": 'name the tenant to query: {"tenant": "..."}'})
        kind = str(body.get("kind", ""))
        if kind not in KINDS:
            raise BadQuery(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        spec = QuerySpec.parse(body, tenant, self._budget(tenant, KINDS[kind]).composition)
        sha = spec.sha256()
        # step 2: a charged query with a recorded release is answered from the log
        with self._lock:
            earlier = self._by_sha.get(sha)
            known = self._known.get(earlier) if earlier else None
        if known is not None and known.released is not None:
            return self._answer(spec, known, cached=True)
        # step 3: exact aggregates before anything is spent
        loop = asyncio.get_running_loop()
        try:
            the_plan = await loop.run_in_executor(None, plan, spec)  # OpenDP calls: off the event loop
            exact = await loop.run_in_executor(None, aggregates, spec, self._read_rows)
        except Exception as exc:
            message = getattr(exc, "message", None) or str(exc)
            if spec.kind == "savings_distribution" and "savings" in message:
                message = "savings are not projected yet (tokens_charged has no savings column): " + message
            raise DpRefused(500, {"error": f"reading the projections failed (nothing was spent): {message}"}) from None
        # step 4: the request is a fact on the budget's partition; the agent decides
        query_id = str(uuid7())
        eid = str(uuid7())
        request = DpQueryRequested(
            envelope=Envelope(eid, "DpQueryRequested", 1, tenant, datetime.now(UTC), eid, PRODUCER),
            query_id=query_id,
            metric_set=spec.metric_set,
            composition=spec.composition,
            epsilon=the_plan.epsilon,
            delta=0.0,
            query_sha256=sha,
            query=spec.canonical(),
            requested_by=reader.who,
            rho=the_plan.rho,
        )
        try:
            await self._publisher.publish([request], timeout=10.0)
        except PublishFailed as exc:
            raise DpRefused(
                503, {"error": f"could not record the request on Kafka (nothing was spent): {exc}"}
            ) from None
        # steps 4-5 run as a task of their own: should this client give up waiting, the decision is
        # still followed through (a charge is released and recorded), so asking again gets it
        task = asyncio.ensure_future(self._decide_and_release(spec, the_plan, exact, query_id))
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.decision_timeout_s)
        except TimeoutError:
            raise DpRefused(
                503,
                {"error": f"no decision for query {query_id} within {self.decision_timeout_s:.0f} s: is the DP budget "
                 "agent running (`python -m agents.dp_budget`)? It is still pending: if it is charged, its release "
                 "is recorded, and asking the same query again returns it without paying twice.",
                 "query_id": query_id},
            ) from None  # fmt: skip

    def _forget(self, task: asyncio.Future[dict[str, Any]]) -> None:
        """Drop a finished task; its outcome is on the log (a refusal nobody waited for is not an error)."""
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # marks it retrieved: asyncio would log an unretrieved refusal as an error

    async def _decide_and_release(
        self, spec: QuerySpec, the_plan: Plan, exact: Aggregates, query_id: str
    ) -> dict[str, Any]:
        known = await self._wait(query_id, lambda k: k.decision is not None, PENDING_MAX_S)
        decision = known.decision
        if decision is None:
            raise DpRefused(503, {"error": f"no decision for query {query_id}", "query_id": query_id})
        if isinstance(decision, DpQueryRefused):
            return await self._refused(spec, decision)
        # step 5: noise only now, and the release recorded before it is shown
        try:
            result = release(spec, the_plan, exact)
            result["noise_scale"] = {c.name: c.scale for c in the_plan.components}
            result["loss"] = {"epsilon" if spec.composition == "basic" else "rho": str(the_plan.loss)}
            if spec.kind == "mean_cost_per_request":
                result["cost_unit"] = str(MICRO)
            published = DpReleasePublished(
                envelope=decision.envelope.caused_by("DpReleasePublished", PRODUCER),
                query_id=query_id,
                metric_set=spec.metric_set,
                window_start=spec.window_start,
                window_end=spec.window_end,
                mechanism=the_plan.mechanism,
                result=orjson.dumps(result).decode(),
            )
            await self._publisher.publish([published], timeout=10.0)
        except PublishFailed as exc:
            raise DpRefused(
                503,
                {"error": f"query {query_id} was charged but its release could not be recorded ({exc}); "
                 "it will not be computed again", "query_id": query_id},
            ) from None  # fmt: skip
        with self._lock:  # the follower may not have seen it yet; what we recorded is the release
            known = self._known.setdefault(query_id, _Known())
            if known.released is None:
                known.released = published
        return self._answer(spec, known, cached=False)

    async def _refused(self, spec: QuerySpec, decision: DpQueryRefused) -> dict[str, Any]:
        if decision.reason == "repeat" and decision.repeat_of:
            first = decision.repeat_of
            known = await self._wait(first, lambda k: k.released is not None, self.decision_timeout_s)
            if known.released is not None:
                return self._answer(spec, known, cached=True)
            raise DpRefused(
                409,
                {"error": f"the same query was charged as {first} but its release was never recorded "
                 "(the read side stopped in between); it is not computed twice. Ask with another window or loss.",
                 "query_id": first},
            )  # fmt: skip
        status = {"no-budget": 404, "exhausted": 409}.get(decision.reason, 409)
        remaining: dict[str, Any] = {"epsilon": decision.epsilon_remaining, "delta": decision.delta_remaining}
        if decision.rho_remaining is not None:
            remaining["rho"] = decision.rho_remaining
        raise DpRefused(
            status,
            {"error": f"refused ({decision.reason}): {decision.detail}", "reason": decision.reason,
             "query_id": decision.query_id, "remaining": remaining},
        )  # fmt: skip

    def budget_list(self, tenant: str | None) -> list[Budget]:
        with self._lock:
            return [b for b in self.budgets.values() if tenant is None or b.tenant == tenant]


def register(app: web.Application, get: Callable[[], DpReadSide | None]) -> None:
    """Add the DP routes to the read side's app; `get` returns the running DpReadSide (None without Kafka)."""

    def side() -> DpReadSide:
        dp = get()
        if dp is None:
            raise DpRefused(503, {"error": "this read side has no Kafka bootstrap: DP queries need the broker"})
        return dp

    def reply(status: int, body: Any) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    async def query(request: web.Request) -> web.Response:
        try:
            raw = await request.read()
            try:
                body = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError as exc:
                raise DpRefused(400, {"error": f"the body is not JSON ({exc})"}) from None
            if not isinstance(body, dict):
                raise DpRefused(400, {"error": "send a JSON object"})
            return reply(200, await side().query(request[READER], body))
        except DpRefused as exc:
            return reply(exc.status, exc.body)
        except AccessDenied as exc:
            return reply(exc.status, {"error": exc.message})
        except BadQuery as exc:
            return reply(400, {"error": str(exc)})

    def _scoped(request: web.Request) -> str | None:
        return scoped_tenant(request[READER], request.query.get("tenant"))

    async def budgets(request: web.Request) -> web.Response:
        try:
            tenant = _scoped(request)
            found = side().budget_list(tenant)
        except DpRefused as exc:
            return reply(exc.status, exc.body)
        except AccessDenied as exc:
            return reply(exc.status, {"error": exc.message})
        return reply(200, {"tenant": tenant, "budgets": [b.summary() for b in sorted(found, key=lambda b: b.key)]})

    async def realloc(request: web.Request) -> web.Response:
        try:
            tenant = _scoped(request)
            near = float(request.query.get("near", "0.8"))
            unused = float(request.query.get("unused", "0.2"))
            if not (0.0 <= near <= 1.0 and 0.0 <= unused <= 1.0):  # also refuses nan and inf
                raise ValueError("out of range")
            found = side().budget_list(tenant)
        except DpRefused as exc:
            return reply(exc.status, exc.body)
        except AccessDenied as exc:
            return reply(exc.status, {"error": exc.message})
        except ValueError:
            return reply(400, {"error": "near and unused are fractions between 0 and 1, e.g. near=0.8&unused=0.2"})
        return reply(200, {"tenant": tenant, **reallocation(found, near, unused)})

    app.router.add_post(PATHS[0], query)
    app.router.add_get(PATHS[1], budgets)
    app.router.add_get(PATHS[2], realloc)
