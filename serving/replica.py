"""The engine deployment of a pool: one Engine per replica, the tenants it holds, its reports.

The ingress (serving/app.py) calls `generate` through a handle whose `multiplexed_model_id`
is the tenant, so Serve routes a tenant to the replicas that already hold it (Ray's
`@serve.multiplexed`: a replica advertises what it holds; the router prefers those and,
when none is free, the replica holding the fewest). A replica holds at most
`max_tenants_per_replica` tenants, dropping the least recently used; holding a tenant means
it is registered in the replica's DeltaBank, whose own tiers (device slots, host memory)
decide where its delta lives. Each replica batches across whatever tenants it holds: routing
by tenant does not split batches.

With `placement: all` (today's small-pool layout) every replica registers every tenant at
`reconfigure` and requests carry no multiplexed id.

Every few seconds, and when what it holds changes, a replica tells the pool's
TenantDirectory (serving/directory.py) what it holds and what failed to load, so the
tenant-status route can say which replicas hold a tenant now.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

from ray import serve

from .bank import FAILED, READY
from .config import DEPLOYMENT, DIRECTORY, AppArgs, TenantReport, parse_args, parse_tenants, resolve_uri
from .engine import BASE_TENANT, Engine, EngineError, Event, TenantUnavailable, UnknownTenant
from .openai_api import ChatRequest, CompletionRequest, chat_prompt

log = logging.getLogger("deltafleet.serving")

REPORT_EVERY_S = 2.0  # a replica's report to the directory, at the latest (sooner when something changed)
FAILURE_KEPT_S = 300.0  # a failed load stays in this replica's report this long (or until a load succeeds)
LOAD_POLL_S = 0.01


def in_replica() -> bool:
    try:
        serve.get_replica_context()
    except Exception:  # noqa: BLE001 -- RayServeException: not inside a Serve replica
        return False
    return True


def replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 -- outside a replica (unit use): the process is the replica
        return f"pid-{os.getpid()}"


async def submitted(submit):
    """`submit(abandoned)` (tokenize + queue, on a worker thread) awaited so that a caller who
    leaves meanwhile never gets its request run: the thread cannot be stopped, so the engine
    checks `abandoned()` after tokenizing, before queueing."""
    gone = threading.Event()
    fut = asyncio.ensure_future(asyncio.to_thread(submit, gone.is_set))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        gone.set()
        fut.add_done_callback(lambda f: f.result().cancel() if not f.cancelled() and f.exception() is None else None)
        raise


class HeldTenant:
    """What Serve's multiplexed LRU keeps for a tenant this replica holds. Serve calls
    `__del__` when it drops the tenant; the bank entry goes once no request of it is in flight."""

    def __init__(self, server: DeltaServer, name: str) -> None:
        self.server, self.name, self.dropped = server, name, False

    def __del__(self) -> None:  # called by Serve, then again by the garbage collector: once is enough
        if not self.dropped:
            self.dropped = True
            self.server._drop(self.name)


# Above what the engine runs and queues at its defaults (a batch + max_queue, and a batch of
# slack), so that the engine's OpenAI-shaped 429 comes first, never Serve's own rejection.
MAX_ONGOING_REQUESTS = 2 * AppArgs.model_fields["max_batch_size"].default + AppArgs.model_fields["max_queue"].default


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10)
class DeltaServer:
    def __init__(self, args: dict) -> None:
        self.args = parse_args(args)
        from .metrics import PoolMetrics

        self.metrics = PoolMetrics(self.args.pool)
        self.engine = Engine.from_args(self.args, on_step=self.metrics.step)
        self.paths: dict[str, Path] = {}  # the pool's tenants (the catalog) -> their delta files
        self.uris: dict[str, str] = {}
        self.inflight: dict[str, int] = {}  # tenant -> its requests on this replica now
        self.dropped: set[str] = set()  # let go by Serve's LRU while requests of it were in flight
        self.failures: dict[str, tuple[str, str, float]] = {}  # tenant -> (uri, why, when) of a failed load
        self._lock = threading.Lock()
        self.capacity = self.args.max_tenants_per_replica or self.engine.bank.capacity()

        async def hold(tenant: str) -> HeldTenant:  # Serve's LRU of the tenants this replica holds
            return await self._load(tenant)

        self.hold = serve.multiplexed(max_num_models_per_replica=self.capacity)(hold)
        self._stop = threading.Event()
        self._changed = threading.Event()
        if in_replica():  # in-process use (tests, tools) has no directory to report to
            threading.Thread(target=self._report_loop, name="tenant-report", daemon=True).start()

    # ---- the catalog ------------------------------------------------------------------
    def reconfigure(self, user_config: dict) -> None:
        """The pool's tenant set. Routed: held tenants whose delta changed are re-registered and
        removed ones unregistered; the rest load when routed here. `placement: all`: all of them."""
        cfg = parse_tenants(user_config, pool=self.args.pool)
        paths = {name: resolve_uri(spec.uri, self.args.store_root) for name, spec in cfg.tenants.items()}
        with self._lock:
            self.paths, self.uris = paths, {name: spec.uri for name, spec in cfg.tenants.items()}
        if self.args.placement == "all":
            self.engine.set_tenants(paths)
        else:
            bank = self.engine.bank
            for name in bank.names():
                if name not in paths:
                    bank.unregister(name)
                else:
                    bank.register(name, paths[name])  # a no-op unless its delta changed
        self._changed.set()

    async def _load(self, tenant: str) -> HeldTenant:
        """Register the tenant's delta and wait until the bank has read and verified it.
        A delta that cannot be used raises (Serve then does not count it as held)."""
        path = self.paths.get(tenant)
        if path is None:
            raise UnknownTenant(f"model {tenant!r} is not served by this pool")
        bank = self.engine.bank
        with self._lock:
            self.dropped.discard(tenant)
        bank.register(tenant, path)
        deadline = time.monotonic() + self.args.load_timeout_s
        while (entry := bank.status(tenant)) is not None and entry.status not in (READY, FAILED):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(LOAD_POLL_S)
        self._changed.set()
        if entry is not None and entry.status == READY:
            self.failures.pop(tenant, None)
            return HeldTenant(self, tenant)
        why = entry.error if entry is not None and entry.error else f"not loaded within {self.args.load_timeout_s:.0f}s"
        self.failures[tenant] = (self.uris.get(tenant, ""), why, time.time())
        bank.unregister(tenant)  # not held: the next request for it tries again
        raise TenantUnavailable(f"model {tenant!r} failed to load: {why}")

    def _drop(self, tenant: str) -> None:
        """Serve's LRU let the tenant go (on an executor thread): unregister it now, or when its
        last request ends, so a request already queued for it is still served."""
        with self._lock:
            busy = self.inflight.get(tenant, 0) > 0
            if busy:
                self.dropped.add(tenant)
        if not busy:
            self.engine.bank.unregister(tenant)
        self._changed.set()

    async def _enter(self, tenant: str) -> None:
        """Hold the tenant for one request (loading it if this replica does not hold it)."""
        if self.args.placement == "all":
            return
        with self._lock:
            self.inflight[tenant] = self.inflight.get(tenant, 0) + 1
        await self.hold(tenant)
        path = self.paths.get(tenant)
        if path is None:
            raise UnknownTenant(f"model {tenant!r} is not served by this pool")
        self.engine.bank.register(tenant, path)  # a no-op when held; back after a removal or a new delta

    def _leave(self, tenant: str) -> None:
        if self.args.placement == "all":
            return
        with self._lock:
            left = self.inflight.get(tenant, 1) - 1
            if left:
                self.inflight[tenant] = left
                return
            self.inflight.pop(tenant, None)
            gone = tenant in self.dropped
            self.dropped.discard(tenant)
        if gone:
            self.engine.bank.unregister(tenant)
            self._changed.set()

    # ---- calls from the ingress and the directory ------------------------------------
    async def generate(self, tenant: str | None, request: CompletionRequest | ChatRequest):
        """One OpenAI request the ingress validated, for a tenant (None: the base) -> the engine's
        Events; an error before the first token is the first and only Event. Tokenizing (and a
        chat template) runs on a worker thread here, so a huge prompt never stalls the ingress."""
        chat = isinstance(request, ChatRequest)
        prompt = (lambda: chat_prompt(self.engine.tokenizer, request.messages)) if chat else request.prompt
        default_max_tokens = None if chat else 16  # OpenAI's: chat runs to the end or the context
        entered = False
        try:
            if tenant is not BASE_TENANT:
                entered = True
                await self._enter(tenant)
            loop = asyncio.get_running_loop()

            def submit(abandoned):
                return self.engine.submit(tenant, prompt() if callable(prompt) else prompt,
                                          request.sampling(default_max_tokens), loop=loop, abandoned=abandoned)

            stream = await submitted(submit)
        except EngineError as e:
            if entered:
                self._leave(tenant)
            yield Event("", [], error=e)
            return
        except BaseException:
            if entered:
                self._leave(tenant)
            raise
        try:
            async for ev in stream:
                yield ev
        finally:
            stream.cancel()  # a no-op when finished; frees the row when the caller went away
            if entered:
                self._leave(tenant)

    async def check(self, tenant: str) -> dict:
        """The directory's load check: hold the tenant (loading it if this replica does not)."""
        try:
            await self._enter(tenant)
        except EngineError as e:
            return {"state": FAILED, "error": str(e), "replica": replica_id()}
        else:
            self._leave(tenant)
        return {"state": READY, "error": None, "replica": replica_id()}

    def debug(self) -> dict:
        return {"pid": os.getpid(), "pool": self.args.pool, "replica": replica_id(), "uris": self.uris,
                "capacity": self.capacity, **self.engine.stats()}

    def check_health(self) -> None:
        """Ray replaces a replica whose health check raises."""
        problem = self.engine.problem()  # a dead thread, an unexpected loop error, a sticky device error
        if problem:
            raise RuntimeError(problem)
        self.metrics.bank(self.engine.bank.stats())

    # ---- reports to the directory ------------------------------------------------------
    def figures(self) -> dict:
        """The bank's counters and resident bytes (benchmarks and dashboards read them from the directory)."""
        st = self.engine.bank.stats()
        return {k: v for k, v in st.items() if k != "tenants"} | {"held": len(self.engine.bank.names()),
                                                                   "capacity": self.capacity, "pid": os.getpid()}

    def held(self) -> dict[str, TenantReport]:
        """What this replica holds (and what failed to load here lately), for the directory."""
        bank, now = self.engine.bank, time.time()
        out: dict[str, TenantReport] = {}
        for name in bank.names():
            entry = bank.status(name)
            if entry is not None and (name not in self.dropped or entry.status != READY):
                out[name] = TenantReport(state=entry.status, error=entry.error, uri=self.uris.get(name, ""))
        for name, (uri, why, when) in list(self.failures.items()):
            if now - when > FAILURE_KEPT_S:
                self.failures.pop(name, None)
            elif name not in out or out[name].state != READY:
                out[name] = TenantReport(state=FAILED, error=why, uri=uri)
        return out

    def _report_loop(self) -> None:
        directory, last, last_at = None, None, 0.0
        while not self._stop.is_set():
            self._changed.wait(REPORT_EVERY_S / 4)
            self._changed.clear()
            try:
                now = {n: r.model_dump() for n, r in self.held().items()}
                if now == last and time.monotonic() - last_at < REPORT_EVERY_S:
                    continue
                if directory is None:
                    directory = serve.get_deployment_handle(DIRECTORY, app_name=self.args.pool)
                directory.report.remote(replica_id(), now, self.figures()).result(timeout_s=10)
                last, last_at = now, time.monotonic()
            except Exception as e:  # noqa: BLE001 -- the directory restarting, or not up yet: try again
                log.debug("tenant report: %s", e)
                time.sleep(REPORT_EVERY_S / 2)

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
