"""``GET <prefix>metrics``: glb's figures in the Prometheus text format, made by prometheus_client.

Every metric is declared once in ``METRICS`` (name, type, labels, doc); the
README's list is generated from it. Nothing is counted through
prometheus_client: the relay, the registry and ``glb.stats`` keep plain
integers on objects they already have, and ``BalancerCollector.collect`` reads
them when Prometheus scrapes. A frame costs the hot path no lock, no label
lookup and no call; a scrape costs one pass over the open sessions.

Each Balancer has its own ``CollectorRegistry`` (several run in one test
process) holding this collector and prometheus_client's process collector
(CPU, RSS, open file descriptors).
"""

from typing import NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)

from glb import __version__
from glb.errors import Status
from glb.registry import CONNECTING, DRAINING, GONE, READY, UP
from glb.stats import DIRECTIONS, backend_figures
from glb.status import refuse_operator_read

KINDS = ("client", "control", "own")
STATES = (CONNECTING, READY, DRAINING, GONE)


class Metric(NamedTuple):
    name: str
    type: str  # gauge, counter, histogram or info
    labels: tuple
    doc: str


METRICS = (
    Metric("glb_info", "info", ("version",), "The glb version serving."),
    Metric("glb_start_time_seconds", "gauge", (), "When this glb started, in seconds since the epoch."),
    Metric("glb_connections", "gauge", ("kind",),
           "Open WebSockets accepted by glb: client sessions, control channels, own sessions."),
    Metric("glb_connections_total", "counter", ("kind",), "WebSockets accepted by glb since it started."),
    Metric("glb_connections_refused_total", "counter", ("limit",),
           "TCP connections refused at accept (503 or closed), by the limit reached: max_connections, "
           "max_connections_per_ip, out_of_descriptors."),
    Metric("glb_backend_up", "gauge", ("backend",),
           "1 when the backend takes new sessions (ready and passing its health checks), else 0."),
    Metric("glb_backend_healthy", "gauge", ("backend",),
           "1 while the backend passes its health checks (or has none), 0 while it is down."),
    Metric("glb_backend_state", "gauge", ("backend", "state"),
           "1 for the backend's current state (connecting, ready, draining, gone), 0 for the others."),
    Metric("glb_backend_sessions", "gauge", ("backend",), "Sessions glb relays to the backend now."),
    Metric("glb_backend_reported_clients", "gauge", ("backend",),
           "Clients the backend reports as connected to it directly."),
    Metric("glb_backend_weight", "gauge", ("backend",), "The backend's weight for weighted balancing."),
    Metric("glb_backend_effective_weight", "gauge", ("backend",),
           "The weight balancing uses now: below glb_backend_weight while slow start ramps it up."),
    Metric("glb_backend_sessions_total", "counter", ("backend",), "Sessions relayed to the backend that ended."),
    Metric("glb_backend_connect_failures_total", "counter", ("backend",),
           "Times a new session could not reach the backend (refused, timed out, bad handshake)."),
    Metric("glb_ws_messages_total", "counter", ("backend", "direction"),
           "WebSocket data messages relayed, by backend and direction (to_backend, to_client)."),
    Metric("glb_ws_bytes_total", "counter", ("backend", "direction"),
           "Bytes of WebSocket frames relayed, headers and control frames included, by backend and direction."),
    Metric("glb_ws_closes_total", "counter", ("code", "closed_by"),
           "Client sessions ended, by close code and by who closed (client, backend, glb)."),
    Metric("glb_session_duration_seconds", "histogram", (), "How long client sessions lasted."),
    Metric("glb_handshake_rejections_total", "counter", ("status",),
           "WebSocket upgrades answered with an HTTP error instead of 101, by status."),
    Metric("glb_http_requests_total", "counter", ("backend", "code"),
           "Plain HTTP requests answered, by backend (- when glb answered) and status code."),
    Metric("glb_http_response_bytes_total", "counter", ("backend",), "Response body bytes of plain HTTP requests."),
    Metric("glb_http_request_duration_seconds", "histogram", (),
           "Time from a plain HTTP request's arrival to its response head."),
    Metric("glb_broadcast_envelopes_total", "counter", (), "Broadcast envelopes fanned out to the backends."),
    Metric("glb_broadcast_dropped_total", "counter", (),
           "Copies of broadcast envelopes dropped because a backend's control channel queue was full."),
    Metric("glb_rebalance_closes_total", "counter", (),
           "Client sessions closed (1012) by rebalancing so their clients reconnect to emptier backends."),
    Metric("glb_heartbeat_evictions_total", "counter", (),
           "Registered backends taken out because their control channel missed a heartbeat."),
    Metric("glb_event_handler_errors_total", "counter", ("event",), "Handler calls that raised, by event."),
    Metric("glb_config_reloads_total", "counter", ("result",),
           "Config reloads (SIGHUP, admin API), by result: applied, or refused (the running config stayed)."),
    Metric("glb_config_last_reload_successful", "gauge", (),
           "0 when the last reload was refused, so the running config is not the one on disk; else 1."),
)

_FAMILY = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "info": InfoMetricFamily}


def families():
    """A fresh, empty family per declared metric, by name."""
    made = {}
    for metric in METRICS:
        if metric.type == "histogram":
            made[metric.name] = HistogramMetricFamily(metric.name, metric.doc)
        elif metric.type == "info":
            made[metric.name] = InfoMetricFamily(metric.name[:-len("_info")] or metric.name, metric.doc,
                                                 labels=metric.labels)
        else:
            made[metric.name] = _FAMILY[metric.type](metric.name, metric.doc, labels=metric.labels)
    return made


class BalancerCollector:
    """Reads one Balancer's counters at scrape time (a prometheus_client custom collector)."""

    def __init__(self, balancer):
        self.balancer = balancer

    def describe(self):
        return []  # names are known, but describing would make the registry collect at registration

    def collect(self):
        balancer, stats = self.balancer, self.balancer.stats
        f = families()
        f["glb_info"].add_metric([], {"version": __version__})
        f["glb_start_time_seconds"].add_metric([], stats.started)
        open_by_kind = dict.fromkeys(KINDS, 0)
        for conn in list(balancer.connections.values()):
            open_by_kind[conn.kind] = open_by_kind.get(conn.kind, 0) + 1
        for kind in KINDS:
            f["glb_connections"].add_metric([kind], open_by_kind[kind])
            f["glb_connections_total"].add_metric([kind], stats.connections_total.get(kind, 0))
        for limit, count in sorted(stats.connections_refused.items()):
            f["glb_connections_refused_total"].add_metric([limit], count)
        for backend in balancer.registry.all():
            name = backend.name
            f["glb_backend_up"].add_metric([name], 1 if backend.state == READY and backend.health == UP else 0)
            f["glb_backend_healthy"].add_metric([name], 1 if backend.health == UP else 0)
            for state in STATES:
                f["glb_backend_state"].add_metric([name, state], 1 if backend.state == state else 0)
            f["glb_backend_sessions"].add_metric([name], backend.relayed)
            f["glb_backend_reported_clients"].add_metric([name], len(backend.reported_clients))
            f["glb_backend_weight"].add_metric([name], backend.weight)
            f["glb_backend_effective_weight"].add_metric([name], backend.effective_weight)
        for name, figures in sorted(backend_figures(balancer).items()):
            totals = stats.backends.get(name)
            f["glb_backend_sessions_total"].add_metric([name], totals.sessions if totals else 0)
            f["glb_backend_connect_failures_total"].add_metric([name], totals.connect_failures if totals else 0)
            for direction in DIRECTIONS:
                f["glb_ws_messages_total"].add_metric([name, direction], figures.messages(direction))
                f["glb_ws_bytes_total"].add_metric([name, direction], figures.bytes(direction))
        for (code, closed_by), count in sorted(stats.closes.items()):
            f["glb_ws_closes_total"].add_metric([str(code), closed_by], count)
        for status, count in sorted(stats.handshake_rejections.items()):
            f["glb_handshake_rejections_total"].add_metric([str(status)], count)
        for (name, code), count in sorted(stats.http_requests.items()):
            f["glb_http_requests_total"].add_metric([name, str(code)], count)
        for name, count in sorted(stats.http_bytes.items()):
            f["glb_http_response_bytes_total"].add_metric([name], count)
        for metric, histogram in (("glb_session_duration_seconds", stats.session_duration),
                                  ("glb_http_request_duration_seconds", stats.http_duration)):
            f[metric].add_metric([], histogram.cumulative(), histogram.sum)
        f["glb_broadcast_envelopes_total"].add_metric([], stats.broadcast_envelopes)
        f["glb_broadcast_dropped_total"].add_metric([], stats.broadcast_dropped)
        f["glb_rebalance_closes_total"].add_metric([], balancer.rebalance_closes)
        f["glb_heartbeat_evictions_total"].add_metric([], balancer.health.evictions)
        for result in ("applied", "refused"):
            f["glb_config_reloads_total"].add_metric([result], stats.reloads[result])
        f["glb_config_last_reload_successful"].add_metric([], 1 if stats.last_reload_ok else 0)
        for event, count in sorted(balancer.bus.handler_errors.items()):
            if count:
                f["glb_event_handler_errors_total"].add_metric([event], count)
        return f.values()


def make_registry(balancer):
    """A registry of its own for one Balancer: its collector plus the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalancerCollector(balancer))
    ProcessCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """WSGI app for ``GET <prefix>metrics``; the same peers as ``<prefix>status`` may read it."""

    def __init__(self, balancer):
        self.balancer = balancer
        self.registry = make_registry(balancer)

    def __call__(self, environ, start_response):
        refused = refuse_operator_read(self.balancer, environ, start_response)
        if refused is not None:
            return refused
        body = generate_latest(self.registry)
        start_response(Status.OK, [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]


def render_names():
    """The README's list of metric names, from ``METRICS``."""
    rows = ["| metric | type | labels | what it counts |", "|---|---|---|---|"]
    rows += [f"| `{m.name}` | {m.type} | {', '.join(m.labels) or '-'} | {m.doc} |" for m in METRICS]
    rows.append("| `process_*` | - | - | CPU seconds, resident memory, open file descriptors "
                "(prometheus_client's process collector). |")
    return "\n".join(rows)
