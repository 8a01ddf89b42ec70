"""Istio-compatible telemetry for the node proxy.

Role: turn what the proxy saw (one HTTP request, one L4 connection) into the
signals existing Istio tooling already reads, so Grafana's Istio dashboards,
Kiali and alert rules work unchanged:

* Istio's standard metrics (``istio_requests_total``, the three request
  histograms and the ``istio_tcp_*`` family) with Istio's label names, its
  "unknown"/"latest" defaults and Envoy's default histogram buckets, served as
  Prometheus text on ``:15020/metrics`` like ztunnel and pilot-agent do;
* one JSON access-log line per request and per closed L4 connection, with
  Envoy's field names and short response flags;
* the request headers a mesh hop owns: ``x-request-id`` (added when absent)
  and a validated W3C ``traceparent``.

It is sans-IO apart from ``Telemetry.serve_metrics``: the proxy calls it once
a request or connection is done, it never touches sockets of the data path.
"""

from __future__ import annotations

import bisect
import errno
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from nodemesh.errors import UserError

Header = tuple[bytes, bytes]
AccessLogSink = Callable[[str], None] | logging.Logger | None

METRICS_PORT = 15020  # where Istio's agents (pilot-agent, ztunnel) serve merged metrics
UNKNOWN = "unknown"
NO_FLAGS = "-"  # Envoy's RESPONSE_FLAGS value when nothing went wrong
ACCESS_LOGGER = "nodemesh.access"

# Longest label value kept. Kubernetes names are at most 253 characters; a little
# more leaves room for SPIFFE principals. Anything longer is cut, never rejected.
MAX_LABEL_LEN = 256

# Envoy's default histogram bounds. Istio sets no buckets of its own for its
# istiocustom histograms (only the statsHistogramBuckets pod annotation changes
# them), so these are the ``le`` values dashboards see: milliseconds for
# istio_request_duration_milliseconds, bytes for the two size histograms.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)

# Label names, in the order Istio's stats filter declares them. The TCP family
# has neither response_code nor grpc_response_status.
PEER_LABELS: tuple[str, ...] = (
    "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_service", "destination_service_name",
    "destination_service_namespace", "destination_canonical_service",
    "destination_canonical_revision", "destination_cluster",
)
TCP_LABELS: tuple[str, ...] = (
    "reporter", *PEER_LABELS, "request_protocol", "response_flags", "connection_security_policy",
)
HTTP_LABELS: tuple[str, ...] = (*TCP_LABELS, "response_code", "grpc_response_status")

REPORTERS = frozenset({"source", "destination", "waypoint"})
SECURITY_POLICIES = frozenset({"mutual_tls", "none", UNKNOWN})
REQUEST_PROTOCOLS = frozenset({"http", "grpc"})


class ResponseFlag:
    """Envoy's short response flags, named for call sites (``ResponseFlag.UPSTREAM_OVERFLOW``).

    A request or connection may carry several: pass them joined with ``,``
    (``join_flags`` does it); ``NO_FLAGS`` ("-") means none.
    """

    FAILED_LOCAL_HEALTH_CHECK = "LH"
    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    LOCAL_RESET = "LR"
    UPSTREAM_REMOTE_RESET = "UR"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    UPSTREAM_OVERFLOW = "UO"
    NO_ROUTE_FOUND = "NR"
    DELAY_INJECTED = "DI"
    FAULT_INJECTED = "FI"
    RATE_LIMITED = "RL"
    UNAUTHORIZED_EXTERNAL_SERVICE = "UAEX"
    RATELIMIT_SERVICE_ERROR = "RLSE"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    STREAM_IDLE_TIMEOUT = "SI"
    INVALID_ENVOY_REQUEST_HEADERS = "IH"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    UPSTREAM_MAX_STREAM_DURATION_REACHED = "UMSDR"
    RESPONSE_FROM_CACHE_FILTER = "RFCF"
    NO_FILTER_CONFIG_FOUND = "NFCF"
    DURATION_TIMEOUT = "DT"
    UPSTREAM_PROTOCOL_ERROR = "UPE"
    NO_CLUSTER_FOUND = "NC"
    OVERLOAD_MANAGER = "OM"
    DNS_FAIL = "DF"
    DROP_OVERLOAD = "DO"
    DOWNSTREAM_REMOTE_RESET = "DR"
    # ztunnel's own L4 flags (Istio ambient): policy denial, upstream connect failure.
    DENY = "DENY"
    CONNECT = "CONNECT"


# Envoy prints several flags in this fixed order; normalising to it keeps one
# label value per combination, whatever order the proxy raised them in.
FLAG_ORDER: tuple[str, ...] = tuple(
    v for k, v in vars(ResponseFlag).items() if not k.startswith("_") and isinstance(v, str))
_FLAG_RANK = {flag: i for i, flag in enumerate(FLAG_ORDER)}


def join_flags(*flags: str | None) -> str:
    """The response_flags value for a set of flags: known ones only, deduplicated, in
    Envoy's order, comma-joined; ``NO_FLAGS`` when none is left. Unknown tokens are
    dropped because the value is a metric label and must stay within a fixed set."""
    seen = {t.strip() for f in flags if f for t in f.split(",")}
    known = sorted((t for t in seen if t in _FLAG_RANK), key=_FLAG_RANK.__getitem__)
    return ",".join(known) or NO_FLAGS


# --- label values ------------------------------------------------------------

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def bounded(value: object, default: str = UNKNOWN) -> str:
    """A metric label value: text without control characters, at most MAX_LABEL_LEN
    long, ``default`` when empty. The cardinality guard for free-form values."""
    text = _CONTROL_CHARS.sub("", _text(value)).strip() if value is not None else ""
    return text[:MAX_LABEL_LEN] if text else default


def _text(value: object) -> str:
    """Header bytes and other values as text; latin-1 keeps every byte of a header."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    return str(value)


@dataclass(frozen=True, slots=True)
class Peer:
    """The labels of one side of a request or connection (the source or the destination
    workload), as Istio names them. Only workload and namespace are needed: app and
    canonical_service stand in for each other (then the workload name), version and
    canonical_revision too (then "latest"); anything still empty is "unknown"."""

    workload: str = ""
    namespace: str = ""
    app: str = ""
    version: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    principal: str = ""  # SPIFFE ID when the peer was authenticated (mTLS), else "unknown"
    cluster: str = ""

    @classmethod
    def from_pod_labels(cls, workload: str, namespace: str, labels: Mapping[str, str], *,
                        service_account: str | None = None, cluster: str = "Kubernetes",
                        trust_domain: str = "cluster.local") -> Peer:
        """A peer from a pod's workload name, namespace and labels, deriving the canonical
        service and revision the way Istio does (its label, then app.kubernetes.io/*, then
        app/version, then the workload name / "latest"). Pass ``service_account`` only when
        the identity is proven (mTLS): it becomes the SPIFFE principal. "Kubernetes" is
        Istio's default cluster ID."""
        canonical = (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
                     or labels.get("app") or workload)
        revision = (labels.get("service.istio.io/canonical-revision")
                    or labels.get("app.kubernetes.io/version") or labels.get("version") or "latest")
        principal = (f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
                     if service_account else "")
        return cls(workload=workload, namespace=namespace, app=labels.get("app") or canonical,
                   version=labels.get("version") or revision, canonical_service=canonical,
                   canonical_revision=revision, principal=principal, cluster=cluster)


@lru_cache(maxsize=4096)
def _peer_values(peer: Peer) -> tuple[str, str, str, str, str, str, str, str]:
    """workload, namespace, principal, app, version, canonical service, canonical revision,
    cluster: the per-side label values in PEER_LABELS order (cached: peers repeat).

    The app/canonical pairs stand in for each other when one is missing, as Istio derives
    the canonical service from the app label (else the workload name) and ztunnel
    reports the canonical values as app/version; the revision falls back to "latest".
    """
    canonical = peer.canonical_service or peer.app or peer.workload
    revision = peer.canonical_revision or peer.version
    return (bounded(peer.workload), bounded(peer.namespace), bounded(peer.principal),
            bounded(peer.app or canonical), bounded(peer.version or revision), bounded(canonical),
            bounded(revision, "latest"), bounded(peer.cluster))


@lru_cache(maxsize=4096)
def service_labels(host: str, destination_namespace: str) -> tuple[str, str, str]:
    """destination_service, destination_service_name and destination_service_namespace
    for a service host (an FQDN, or an authority with a port). Anything that is not a
    host name or an IP becomes "unknown" so a client's Host header cannot mint series.
    The name is the host's first label (as Istio falls back to); the namespace comes
    from ``<name>.<namespace>.svc...`` or else from the destination workload."""
    host = _service_host(host)
    if host == UNKNOWN:
        return UNKNOWN, UNKNOWN, bounded(destination_namespace)
    try:
        ipaddress.ip_address(host)
        return host, host, bounded(destination_namespace)
    except ValueError:
        pass
    parts = host.split(".")
    namespace = parts[1] if len(parts) >= 3 and parts[2] == "svc" else destination_namespace
    return host, parts[0], bounded(namespace)


def _service_host(authority: str) -> str:
    """The host of an authority, lower case, without port or trailing dot, or "unknown"."""
    host = _text(authority).strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:  # name:port or v4:port; bare v6 has several colons
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return host if len(host) <= 253 and _HOSTNAME.fullmatch(host) else UNKNOWN


def _grpc_status(value: str | int | None) -> str:
    """grpc_response_status: the numeric status as text, "" when not gRPC or unknown
    (Envoy reports "" then). Bounded to small numbers: codes are 0-16."""
    text = _text(value).strip() if value is not None else ""
    return text if text.isdigit() and len(text) <= 2 else ""


def _response_code(code: int) -> str:
    """response_code: the HTTP status, "0" when no response was sent (Envoy's meaning)."""
    return str(code) if isinstance(code, int) and 100 <= code <= 599 else "0"


def _one_of(value: str, allowed: frozenset[str], default: str = UNKNOWN) -> str:
    value = _text(value).strip().lower()
    return value if value in allowed else default


# --- metric storage ------------------------------------------------------------

def _le(bound: float) -> str:
    """A bucket bound as Envoy prints it (``1``, ``0.5``, ``3600000``), so the ``le``
    label values are byte-identical to an Istio proxy's."""
    return f"{bound:.32g}"


class _Counter:
    """A counter family: one value per label-value tuple."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` (0 creates the series: rate() then sees the first increment)."""
        if amount >= 0:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self, with_samples: bool = True) -> Metric:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.values.items() if with_samples else ():
            fam.add_metric(labels, value)
        return fam


class _Histogram:
    """A histogram family with fixed bounds: per label-value tuple, one count per bucket
    (not cumulative; the +Inf overflow last) and the sum."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self.values: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts, total = self.values.setdefault(labels, ([0] * (len(self.bounds) + 1), [0.0]))
        # le is inclusive: a value equal to a bound belongs to that bound's bucket.
        counts[bisect.bisect_left(self.bounds, value)] += 1
        total[0] += value

    def family(self, with_samples: bool = True) -> Metric:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (counts, total) in self.values.items() if with_samples else ():
            running, buckets = 0, []
            for bound, count in zip((*map(_le, self.bounds), "+Inf"), counts, strict=True):
                running += count
                buckets.append((bound, running))
            fam.add_metric(labels, buckets, total[0])
        return fam


class _IstioMetrics(Collector):
    """The eight standard Istio metric families, exposed through a CollectorRegistry.

    A collector of our own rather than prometheus_client's Counter/Histogram: those
    add ``*_created`` series (doubling every series; Istio has none) unless a
    process-wide switch is flipped, and print ``le`` differently from Envoy.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the proxy may record from a thread while a scrape runs
        self.requests = _Counter("istio_requests_total", "Requests handled, one per response.", HTTP_LABELS)
        self.duration = _Histogram("istio_request_duration_milliseconds",
                                   "Request duration in milliseconds.", HTTP_LABELS)
        self.request_bytes = _Histogram("istio_request_bytes", "Request body size in bytes.", HTTP_LABELS)
        self.response_bytes = _Histogram("istio_response_bytes", "Response body size in bytes.",
                                         HTTP_LABELS)
        self.tcp_opened = _Counter("istio_tcp_connections_opened_total", "TCP connections opened.",
                                   TCP_LABELS)
        self.tcp_closed = _Counter("istio_tcp_connections_closed_total", "TCP connections closed.",
                                   TCP_LABELS)
        self.tcp_sent = _Counter("istio_tcp_sent_bytes_total",
                                 "Bytes sent to the client (response direction) on TCP connections.",
                                 TCP_LABELS)
        self.tcp_received = _Counter("istio_tcp_received_bytes_total",
                                     "Bytes received from the client (request direction) on TCP "
                                     "connections.", TCP_LABELS)
        self.all: tuple[_Counter | _Histogram, ...] = (
            self.requests, self.duration, self.request_bytes, self.response_bytes,
            self.tcp_opened, self.tcp_closed, self.tcp_sent, self.tcp_received)

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            families = [m.family() for m in self.all]
        yield from families

    def describe(self) -> Iterator[Metric]:
        # Lets the registry refuse a second Telemetry on the same registry by name.
        yield from (m.family(with_samples=False) for m in self.all)


# --- access log ----------------------------------------------------------------

# Every line has the same keys (null when a value does not apply), as an Envoy
# JSON access log has for HTTP and TCP alike; "kind" tells the two apart.
_LOG_KEYS = (
    "kind", "start_time", "method", "path", "protocol", "response_code", "response_flags",
    "grpc_status", "bytes_received", "bytes_sent", "duration", "upstream_host", "upstream_cluster",
    "downstream_remote_address", "authority", "x_request_id", "traceparent", "reporter",
    "source_workload", "source_namespace", "destination_workload", "destination_namespace",
    "destination_service",
)


def _access_log_writer(sink: AccessLogSink) -> tuple[Callable[[str], None], Callable[[], bool]]:
    """One callable that writes a line (a logger's info(), a plain callable, or by
    default the ``nodemesh.access`` logger, so logging config decides where it goes),
    and one that says whether a line would be written at all: building a line costs
    more than the rest of a short connection's telemetry, so it is skipped when the
    logger is off (``--log-level warning``)."""
    if sink is None:
        sink = logging.getLogger(ACCESS_LOGGER)
    if isinstance(sink, logging.Logger):
        logger = sink
        return logger.info, lambda: logger.isEnabledFor(logging.INFO)
    return sink, lambda: True


def _iso_time(epoch: float) -> str:
    """Envoy's START_TIME form: UTC, milliseconds, ``Z``."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _millis(seconds: float) -> int:
    """Envoy's DURATION: whole milliseconds, truncated."""
    return max(0, int(seconds * 1000 + 1e-6))  # + epsilon: 0.029 s is 29 ms, not 28.99...


def _opt_text(value: object) -> str | None:
    return None if value is None else _text(value)


# --- the public recorder -------------------------------------------------------

@dataclass(slots=True, eq=False)
class TcpStats:
    """The telemetry state of one L4 connection between ``tcp_opened`` and ``tcp_closed``:
    its open-time label values, when it started, and how many bytes are already counted
    (so periodic ``tcp_bytes`` and the final ``tcp_closed`` never count a byte twice)."""

    labels: tuple[str, ...]
    source: Peer
    destination: Peer
    destination_service: str
    upstream: str | None
    downstream: str | None
    upstream_cluster: str | None
    started: float  # monotonic, for the duration
    started_wall: float  # epoch, for start_time
    counted_sent: int = 0
    counted_received: int = 0
    closed: bool = False


_TCP_FLAGS_AT = TCP_LABELS.index("response_flags")
_TCP_SERVICE_AT = TCP_LABELS.index("destination_service")
_LABEL_MEMO_MAX = 4096  # distinct label inputs remembered before the memo starts over


class Telemetry:
    """Records Istio's standard metrics and writes the access log for the node proxy.

    ``registry``: where the metrics live (a new private CollectorRegistry when None, so
    several instances, as in tests, never collide). ``access_log``: a logger, a callable
    taking one line, or None for the ``nodemesh.access`` logger. ``reporter`` is
    "source": the node proxy reports as the client side, like a client sidecar/ztunnel.
    """

    def __init__(self, registry: CollectorRegistry | None = None, access_log: AccessLogSink = None,
                 *, reporter: str = "source") -> None:
        if reporter not in REPORTERS:
            raise ValueError(f"reporter must be one of {sorted(REPORTERS)}, not {reporter!r}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reporter = reporter
        self._metrics = _IstioMetrics()
        self.registry.register(self._metrics)
        # label values by their inputs: the same few peer/service pairs repeat on
        # every connection, and deriving the tuple is most of tcp_opened's cost
        self._label_memo: dict[tuple[Any, ...], tuple[str, ...]] = {}
        self._write, self._logging = _access_log_writer(access_log)

    # HTTP / gRPC

    def request(self, source: Peer, destination: Peer, destination_service: str, *,
                request_protocol: str, response_code: int, grpc_response_status: str | int | None = None,
                response_flags: str = NO_FLAGS, duration_s: float, request_bytes: int,
                response_bytes: int, method: str | bytes, path: str | bytes, authority: str | bytes,
                upstream: str | None = None, request_id: str | bytes | None = None,
                traceparent: str | bytes | None = None, protocol: str | None = None,
                upstream_cluster: str | None = None, downstream: str | None = None,
                start_time: float | None = None, connection_security_policy: str = UNKNOWN) -> None:
        """Record one finished request: +1 istio_requests_total, one observation in each of
        the three histograms (duration in ms, body bytes each way) and one access-log line.

        ``response_code`` 0 means no response reached the client. ``protocol`` is the
        wire version for the log (default HTTP/2 for gRPC, else HTTP/1.1); ``start_time``
        is the epoch start (default: now minus the duration).
        """
        grpc = _one_of(request_protocol, REQUEST_PROTOCOLS, "http") == "grpc"
        grpc_status = _grpc_status(grpc_response_status) if grpc else ""
        flags = join_flags(response_flags)
        common = self._labels(source, destination, destination_service, "grpc" if grpc else "http",
                              flags, connection_security_policy)
        labels = (*common, _response_code(response_code), grpc_status)
        m = self._metrics
        with m.lock:
            m.requests.add(labels)
            m.duration.observe(labels, max(0.0, duration_s) * 1000.0)
            m.request_bytes.observe(labels, max(0, request_bytes))
            m.response_bytes.observe(labels, max(0, response_bytes))
        if not self._logging():
            return
        started = start_time if start_time is not None else time.time() - duration_s
        self._log(
            kind="http", start_time=_iso_time(started), method=_text(method), path=_text(path),
            protocol=protocol or ("HTTP/2" if grpc else "HTTP/1.1"), response_code=response_code,
            response_flags=flags, grpc_status=grpc_status or None,
            bytes_received=request_bytes, bytes_sent=response_bytes, duration=_millis(duration_s),
            upstream_host=upstream, upstream_cluster=upstream_cluster, downstream_remote_address=downstream,
            authority=_text(authority), x_request_id=_opt_text(request_id),
            traceparent=_opt_text(traceparent), **self._peers_for_log(source, destination, labels))

    # TCP

    def tcp_opened(self, source: Peer, destination: Peer, destination_service: str, *,
                   upstream: str | None = None, downstream: str | None = None,
                   upstream_cluster: str | None = None,
                   connection_security_policy: str = UNKNOWN) -> TcpStats:
        """Record a new L4 connection (+1 istio_tcp_connections_opened_total) and return the
        handle to pass to ``tcp_bytes`` and ``tcp_closed``. Call it when the client's
        connection is accepted, before the upstream connect, so failed connects count."""
        labels = self._labels(source, destination, destination_service, "tcp", NO_FLAGS,
                              connection_security_policy)
        m = self._metrics
        with m.lock:
            m.tcp_opened.add(labels)
            # Byte series exist from the start, at 0, like ztunnel's: no first increment is lost.
            m.tcp_sent.add(labels, 0)
            m.tcp_received.add(labels, 0)
        return TcpStats(labels=labels, source=source, destination=destination,
                        destination_service=destination_service, upstream=upstream,
                        downstream=downstream, upstream_cluster=upstream_cluster,
                        started=time.monotonic(), started_wall=time.time())

    def tcp_bytes(self, conn: TcpStats, sent_delta: int, received_delta: int) -> None:
        """Add bytes moved since the last report, for long connections whose byte counters
        should grow before they close. ``sent`` is toward the client (the response
        direction), ``received`` from the client (the request direction), as in Istio."""
        if conn.closed:
            return
        sent, received = max(0, sent_delta), max(0, received_delta)
        with self._metrics.lock:
            self._metrics.tcp_sent.add(conn.labels, sent)
            self._metrics.tcp_received.add(conn.labels, received)
        conn.counted_sent += sent
        conn.counted_received += received

    def tcp_closed(self, conn: TcpStats, *, sent: int, received: int, duration_s: float | None = None,
                   response_flags: str = NO_FLAGS, upstream: str | None = None) -> None:
        """Record the end of an L4 connection: the bytes not yet counted (``sent``/``received``
        are the connection's totals, same directions as ``tcp_bytes``), +1
        istio_tcp_connections_closed_total, and one access-log line. A second call is a no-op.

        Like ztunnel, only the closed counter carries the final response flags; the opened
        and byte counters keep the open-time labels ("-"), which are known before the end.
        """
        if conn.closed:
            return
        conn.closed = True
        # Most connections close as they opened, with no flags: their labels are reused.
        flags = NO_FLAGS if response_flags == NO_FLAGS else join_flags(response_flags)
        closed_labels = conn.labels if flags == conn.labels[_TCP_FLAGS_AT] else (
            *conn.labels[:_TCP_FLAGS_AT], flags, *conn.labels[_TCP_FLAGS_AT + 1:])
        m = self._metrics
        with m.lock:
            m.tcp_sent.add(conn.labels, max(0, sent - conn.counted_sent))
            m.tcp_received.add(conn.labels, max(0, received - conn.counted_received))
            m.tcp_closed.add(closed_labels)
        conn.counted_sent = max(sent, conn.counted_sent)
        conn.counted_received = max(received, conn.counted_received)
        if not self._logging():
            return
        elapsed = duration_s if duration_s is not None else time.monotonic() - conn.started
        self._log(
            kind="tcp", start_time=_iso_time(conn.started_wall), response_flags=flags,
            bytes_received=received, bytes_sent=sent, duration=_millis(elapsed),
            upstream_host=upstream or conn.upstream, upstream_cluster=conn.upstream_cluster,
            downstream_remote_address=conn.downstream,
            **self._peers_for_log(conn.source, conn.destination, conn.labels))

    # metrics endpoint

    async def serve_metrics(self, host: str, port: int = METRICS_PORT, *,
                            ready: Callable[[], bool] | None = None) -> web.AppRunner:
        """Serve ``/metrics`` (Prometheus text format 0.0.4, as Envoy and ztunnel serve it) and
        ``/healthz/ready`` (200, or 503 while ``ready()`` is false) on host:port. Returns the
        runner; ``await runner.cleanup()`` stops it. A port already taken (or not allowed)
        is a UserError, one line saying what to do."""
        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/healthz/ready", _ready_handler(ready))
        runner = web.AppRunner(app, access_log=None)  # scrapes are not traffic: keep them out of logs
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise UserError(_bind_error(host, port, e)) from e
        return runner

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    # helpers

    def _labels(self, source: Peer, destination: Peer, destination_service: str, protocol: str,
                flags: str, security: str) -> tuple[str, ...]:
        """Label values in TCP_LABELS order (HTTP appends response_code and grpc status)."""
        key = (source, destination, destination_service, protocol, flags, security)
        labels = self._label_memo.get(key)
        if labels is not None:
            return labels
        dest = _peer_values(destination)
        service, service_name, service_ns = service_labels(_text(destination_service), dest[1])
        labels = (self.reporter, *_peer_values(source),
                  *dest[:5], service, service_name, service_ns, *dest[5:],
                  protocol, flags, _one_of(security, SECURITY_POLICIES))
        if len(self._label_memo) >= _LABEL_MEMO_MAX:
            self._label_memo.clear()  # peers churned (pods came and went): start over
        self._label_memo[key] = labels
        return labels

    def _peers_for_log(self, source: Peer, destination: Peer, labels: tuple[str, ...]) -> dict[str, Any]:
        src, dst = _peer_values(source), _peer_values(destination)
        return {"reporter": self.reporter, "source_workload": src[0], "source_namespace": src[1],
                "destination_workload": dst[0], "destination_namespace": dst[1],
                "destination_service": labels[_TCP_SERVICE_AT]}

    def _log(self, **fields: Any) -> None:
        """Write one JSON line with every key of _LOG_KEYS, in that order."""
        self._write(json.dumps({k: fields.get(k) for k in _LOG_KEYS}, separators=(",", ":")))


def _ready_handler(ready: Callable[[], bool] | None) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.Response:
        ok = ready is None or ready()
        return web.Response(status=200 if ok else 503, text="ready\n" if ok else "not ready\n")
    return handle


def _bind_error(host: str, port: int, e: OSError) -> str:
    where = f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return (f"cannot serve metrics on {where}: the port is already in use; stop the process "
                f"holding it (ss -ltnp 'sport = :{port}') or choose another metrics port")
    if e.errno == errno.EACCES:
        return f"cannot serve metrics on {where}: permission denied; use a port above 1023 or run as root"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"cannot serve metrics on {where}: {host} is not an address of this machine"
    return f"cannot serve metrics on {where}: {e.strerror or e}"


# --- request headers -----------------------------------------------------------

REQUEST_ID = b"x-request-id"
TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def ensure_request_id(headers: Sequence[Header]) -> tuple[list[Header], str]:
    """Return the headers with an ``x-request-id`` and its value. A non-empty one the client
    sent is kept (Envoy keeps it inside the mesh, so one id follows the request across
    hops); otherwise a new UUID4 is appended, and empty or duplicate ones are removed."""
    out: list[Header] = []
    request_id: str | None = None
    for name, value in headers:
        if name.lower() == REQUEST_ID:
            if request_id is None and value.strip():
                request_id = value.strip().decode("latin-1")
                out.append((name, value))
            continue
        out.append((name, value))
    if request_id is None:
        request_id = str(uuid.uuid4())
        out.append((REQUEST_ID, request_id.encode("ascii")))
    return out, request_id


def parse_traceparent(value: str | bytes) -> tuple[str, str, str] | None:
    """(trace-id, parent-id, flags) of a valid version-00 W3C traceparent, else None.
    Lower-case hex only, exact lengths, all-zero ids invalid, per the W3C spec."""
    text = _text(value).strip(" \t")
    match = _TRACEPARENT_00.fullmatch(text)
    if match is None:
        return None
    trace_id, parent_id, flags = match.groups()
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, flags


def new_span_id() -> str:
    """A random, non-zero 8-byte span id in hex."""
    while (span := secrets.token_hex(8)) == "0" * 16:
        continue
    return span


def propagate_traceparent(headers: Sequence[Header], *, reparent: bool = False
                          ) -> tuple[list[Header], str | None]:
    """Return the headers to forward and the traceparent they carry (None if none).

    A valid traceparent is forwarded unchanged. Why not a new parent-id: in Istio
    ambient, ztunnel is L4 and never reads HTTP headers, and a waypoint (Envoy) only
    creates a span, and so re-parents, when a tracing provider is configured through
    the Telemetry API; without one Envoy passes the header through byte for byte. This
    proxy exports no spans, so a new parent-id would name a span no tracing backend
    ever receives and would break the caller->callee link between the two
    application spans. ``reparent=True`` (keep the trace-id and flags, new parent-id)
    is for the day the proxy reports its own spans.

    An invalid traceparent (bad syntax, version other than 00, zero ids, or several
    headers) is dropped, together with tracestate, which W3C says is meaningless
    without a valid traceparent; the next service then starts a fresh trace. A
    tracestate that arrives without any traceparent is left alone.
    """
    values = [v for n, v in headers if n.lower() == TRACEPARENT]
    if not values:
        return list(headers), None
    parsed = parse_traceparent(values[0]) if len(values) == 1 else None
    if parsed is None:
        return [(n, v) for n, v in headers if n.lower() not in (TRACEPARENT, TRACESTATE)], None
    trace_id, parent_id, flags = parsed
    if not reparent:
        return list(headers), f"00-{trace_id}-{parent_id}-{flags}"
    value = f"00-{trace_id}-{new_span_id()}-{flags}"
    return [(n, value.encode("ascii") if n.lower() == TRACEPARENT else v) for n, v in headers], value
