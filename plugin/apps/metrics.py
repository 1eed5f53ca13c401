"""Prometheus metrics and the admin HTTP port of serve-sip and serve-webrtc (``--metrics-port``).

One small HTTP server on its own thread (never the event loop's) answers:

- ``GET /metrics``  Prometheus text format (`prometheus_client`);
- ``GET /healthz``  JSON ``{"ready", "draining", "listening", "calls_active", "engine": {"alive", "health",
  "open_streams", "max_streams", "free_slots", "has_capacity", "lagging"}}``; HTTP 200 when ready (listening,
  engine serving) and not draining, else 503 — so a load balancer's health check takes a draining node out;
- ``POST /drain``   start a graceful drain (as SIGTERM does; see ``drain.py``); 202 with the /healthz body.

The metrics (all prefixed ``nemotron_``):

- calls (counted where they happen, on the event loop): ``calls_active``, ``calls_answered_total``,
  ``calls_refused_total{reason}`` (``capacity``, ``lag``, ``draining``, ``not_ready``, ``call_limit``,
  ``forbidden``), ``calls_ended_total{outcome}`` (`call_outcome`), ``final_latency_seconds`` (histogram: VAD stop →
  final transcript, the engine's ``Final.latency_s``), ``sip_messages_rate_limited_total``, ``draining``;
- the engine (read from ``Engine.stats``/``health`` at scrape time, `EngineCollector`): ``engine_alive``,
  ``engine_open_streams``, ``engine_max_streams``, ``engine_free_slots``, ``engine_lagging``,
  ``engine_audio_lag_seconds`` (age of the audio in the last step), ``engine_max_audio_lag_seconds``,
  ``engine_realtime_factor`` (step time / chunk duration over the recent steps; > 1 cannot keep up),
  ``engine_steps_total``, ``engine_failed_steps_total``, ``engine_audio_seconds_total``, and the histograms
  ``engine_batch_size`` and ``engine_step_seconds`` (every step, caught up from the engine's recent-step windows).

The engine knows nothing of Prometheus: everything here reads its public figures (and, for step times, its
recent-step window).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "nemotron"
REFUSAL_REASONS = ("capacity", "lag", "draining", "not_ready", "call_limit", "forbidden")
CALL_OUTCOMES = ("caller_hangup", "client_left", "bot_hangup", "drained", "max_length", "rtp_timeout", "no_ack",
                 "server_stopped", "failed", "ended", "other")
FINAL_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.25, 0.5, 1.0, 2.0, 5.0)

# a call's free-text outcome (the SIP server's, a WebRTC session record's) → its label
_OUTCOMES = (
    (re.compile(r"^caller hung up"), "caller_hangup"),
    (re.compile(r"^client left"), "client_left"),
    (re.compile(r"^bot hung up|^application finished"), "bot_hangup"),
    (re.compile(r"^drain"), "drained"),
    (re.compile(r"^max call length"), "max_length"),
    (re.compile(r"^RTP timeout"), "rtp_timeout"),
    (re.compile(r"^no ACK"), "no_ack"),
    (re.compile(r"^server (stopped|shutdown)"), "server_stopped"),
    (re.compile(r"^failed|^pipeline cancelled|^bad SDP"), "failed"),
    (re.compile(r"^ended"), "ended"),
)


def call_outcome(outcome: str) -> str:
    """The ``outcome`` label for how a call ended: one of `CALL_OUTCOMES`."""
    for pattern, label in _OUTCOMES:
        if pattern.search(outcome or ""):
            return label
    return "other"


class CallMetrics:
    """The calls of one server: active, answered, refused by reason, ended by outcome, and VAD stop → final.

    Update it from the event loop; `active` is also readable from the admin thread (a plain int).
    """

    def __init__(self, *, registry: CollectorRegistry):
        self.active = 0
        self._active = Gauge(f"{PREFIX}_calls_active", "Calls in progress (answered, pipeline not yet finished)",
                             registry=registry)
        self._answered = Counter(f"{PREFIX}_calls_answered", "Calls answered (SIP 200 OK, WebRTC SDP answer)",
                                 registry=registry)
        self._refused = Counter(f"{PREFIX}_calls_refused", "Calls refused before being answered, by reason",
                                ["reason"], registry=registry)
        self._ended = Counter(f"{PREFIX}_calls_ended", "Answered calls that ended, by outcome", ["outcome"],
                              registry=registry)
        self._final_latency = Histogram(f"{PREFIX}_final_latency_seconds",
                                        "End of speech (VAD stop) to the final transcript",
                                        buckets=FINAL_LATENCY_BUCKETS, registry=registry)
        for reason in REFUSAL_REASONS:
            self._refused.labels(reason=reason)
        for outcome in CALL_OUTCOMES:
            self._ended.labels(outcome=outcome)

    def answered(self) -> None:
        """A call was answered and its pipeline starts."""
        self.active += 1
        self._active.inc()
        self._answered.inc()

    def ended(self, outcome: str) -> None:
        """An answered call's pipeline finished; ``outcome`` is the call's own text (`call_outcome` labels it)."""
        self.active -= 1
        self._active.dec()
        self._ended.labels(outcome=call_outcome(outcome)).inc()

    def refused(self, reason: str) -> None:
        """A call was refused before it was answered (``reason``: one of `REFUSAL_REASONS`)."""
        self._refused.labels(reason=reason).inc()

    def final(self, latency_s: float | None) -> None:
        """A final transcript arrived ``latency_s`` after the end of speech."""
        if latency_s is not None and latency_s >= 0:
            self._final_latency.observe(latency_s)


class _Buckets:
    """A histogram's cumulative buckets, filled by `observe` and read as a ``HistogramMetricFamily``."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, map(float, self.bounds)), "+Inf"), self.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class EngineCollector:
    """The engine's figures at scrape time: health, streams, lag, real-time factor, and every step's batch size
    and step time as histograms.

    ``engine`` is a callable giving the engine (or None before it exists). The histograms are caught up from the
    engine's windows of recent steps (``stats.batch_sizes``: 10 000 steps; the step times: the last 200) at each
    scrape and by `catch_up`, which a server calls every second so no step falls out of the window unseen.
    """

    def __init__(self, *, engine: Callable[[], object | None]):
        self._engine = engine
        self._lock = threading.Lock()
        self._seen_steps = 0
        self._seen_engine = None
        self._batch = _Buckets(BATCH_BUCKETS)
        self._step = _Buckets(STEP_BUCKETS)

    def catch_up(self) -> None:
        """Observe the steps taken since the last call (thread-safe)."""
        engine = self._engine()
        if engine is None:
            return
        stats = engine.stats
        with self._lock:
            if engine is not self._seen_engine:  # a new engine (the shared one was rebuilt): its steps start at 0
                self._seen_engine, self._seen_steps = engine, 0
            steps = stats.steps
            new = steps - self._seen_steps
            if new <= 0:
                return
            self._seen_steps = steps
            batches = list(stats.batch_sizes)[-new:]
            times = (stats.recent_step_seconds or [stats.last_step_ms / 1000])[-new:]
            for batch in batches:
                self._batch.observe(batch)
            for seconds in times:
                self._step.observe(seconds)

    def collect(self):
        engine = self._engine()
        if engine is None:
            return
        self.catch_up()
        stats = engine.stats

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_engine_{name}", documentation, value=value)

        def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_engine_{name}", documentation, value=value)

        yield gauge("alive", "1 while the engine is loaded and its thread serves streams", float(engine.alive))
        yield gauge("open_streams", "Engine streams open (one per call being transcribed)", engine.open_streams)
        yield gauge("max_streams", "Engine stream slots (calls at once)", engine.max_streams)
        yield gauge("free_slots", "Calls the engine can still take", engine.free_slots)
        yield gauge("lagging", "1 while the engine refuses calls for lagging behind real time", float(engine.lagging))
        yield gauge("audio_lag_seconds", "Age of the oldest audio in the last model step", stats.last_lag_s)
        yield gauge("max_audio_lag_seconds", "Largest audio age seen in a model step", stats.max_lag_s)
        yield gauge("realtime_factor", "Step time per chunk duration over the recent steps (>1: behind)",
                    stats.recent_realtime_factor)
        yield counter("steps", "Model steps", stats.steps)
        yield counter("failed_steps", "Model steps that raised", stats.failed_steps)
        yield counter("audio_seconds", "Seconds of call audio stepped", stats.audio_seconds)
        with self._lock:
            yield self._batch.family(f"{PREFIX}_engine_batch_size", "Streams per model step")
            yield self._step.family(f"{PREFIX}_engine_step_seconds", "Duration of one batched model step")


class ServerStatus:
    """What /healthz says: listening, draining, the engine's health and the number of live calls.

    ``engine`` is a callable giving the engine (or None: a server without one, e.g. with its own STT factory);
    ``drain`` is the server's `drain.Drain`; ``calls`` the server's `CallMetrics`.
    """

    def __init__(self, *, drain, calls: CallMetrics, engine: Callable[[], object | None] = lambda: None):
        self.drain = drain
        self.calls = calls
        self.engine = engine
        self.listening = False

    def snapshot(self) -> tuple[int, dict]:
        """(HTTP status, JSON body) of /healthz."""
        engine = self.engine()
        engine_state = None
        if engine is not None:
            engine_state = {"alive": engine.alive, "health": engine.health, "open_streams": engine.open_streams,
                            "max_streams": engine.max_streams, "free_slots": engine.free_slots,
                            "has_capacity": engine.has_capacity, "lagging": engine.lagging}
        ready = self.listening and (engine is None or engine.alive)
        draining = self.drain.draining
        body = {"ready": ready, "draining": draining, "listening": self.listening,
                "calls_active": self.calls.active, "engine": engine_state}
        return (200 if ready and not draining else 503), body


class ServerMetrics:
    """Everything one server exposes: its registry with `CallMetrics`, `EngineCollector`, the draining gauge and
    the SIP rate-limit counter, plus its `ServerStatus`."""

    def __init__(self, *, drain, engine: Callable[[], object | None] = lambda: None,
                 rate_limited: Callable[[], int] | None = None):
        self.registry = CollectorRegistry()
        self.calls = CallMetrics(registry=self.registry)
        self.engine = EngineCollector(engine=engine)
        self.registry.register(self.engine)
        self.status = ServerStatus(drain=drain, calls=self.calls, engine=engine)
        draining = Gauge(f"{PREFIX}_draining", "1 while the server drains (refuses new calls)",
                         registry=self.registry)
        draining.set_function(lambda: float(drain.draining))
        if rate_limited is not None:
            self.registry.register(_FunctionCounter(f"{PREFIX}_sip_messages_rate_limited",
                                                    "SIP messages dropped by the per-source rate limit",
                                                    rate_limited))

    def exposition(self) -> bytes:
        """The Prometheus text of every metric."""
        return generate_latest(self.registry)


class _FunctionCounter:
    """A counter whose value is read at scrape time."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]):
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


class AdminServer:
    """``/metrics``, ``/healthz`` and ``POST /drain`` over HTTP on its own thread.

    Binds ``host`` (default loopback: /drain has no authentication; bind another address only on a network
    you trust) and ``port`` (0: a free one, see ``port`` after ``start()``).
    """

    def __init__(self, *, metrics: ServerMetrics, drain, host: str = "127.0.0.1", port: int = 0):
        self.metrics = metrics
        self.drain = drain
        self.host = host
        self.port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen and serve on a daemon thread; returns the port."""
        admin = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pipecat-nemotron"

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, admin.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    status, body = admin.metrics.status.snapshot()
                    self._json(status, body)
                else:
                    self._json(404, {"error": "not found: GET /metrics, GET /healthz, POST /drain"})

            def do_POST(self):
                if self.path.split("?", 1)[0] != "/drain":
                    self._json(404, {"error": "not found: POST /drain"})
                    return
                admin.drain.request_threadsafe(f"POST /drain from {self.client_address[0]}")
                _, body = admin.metrics.status.snapshot()
                body["draining"] = True
                self._json(202, body)

            def _json(self, status: int, body: dict):
                self._send(status, json.dumps(body).encode(), "application/json")

            def _send(self, status: int, data: bytes, content_type: str):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):  # scrapes every few seconds: not in the server's log
                pass

        try:
            self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as error:
            raise OSError(error.errno, f"metrics port {self.host}:{self.port}: {error.strerror}") from None
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="nemotron-admin", daemon=True)
        self._thread.start()
        logger.info(f"metrics on http://{self.host}:{self.port}/metrics (also /healthz, POST /drain)")
        return self.port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


__all__ = ["AdminServer", "CALL_OUTCOMES", "CallMetrics", "EngineCollector", "REFUSAL_REASONS", "ServerMetrics",
           "ServerStatus", "call_outcome"]
