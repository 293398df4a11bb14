"""Reload: apply a changed config to a running glb without touching its open sessions.

Three steps, so that a bad config changes nothing::

    diff(old, new)            what differs (pure; one log line via Changes.describe)
    prepare(balancer, new)    everything that can fail, with nothing running touched:
                              handler modules imported afresh, TLS contexts built by the
                              new handlers, new listeners bound (not yet accepting)
    Plan.commit()             the swap, with no yield in between: handler receivers,
                              settings, static backends, policy, routes, TLS contexts,
                              listeners; or Plan.abandon() closes what prepare opened

Timeouts and limits are read from ``balancer.settings`` where they are used, so
swapping the settings object applies every such setting, one added later
included, to new connections and the next round of checks; open sessions keep
their sockets, backends and handler-free relay. Only state *built* from
settings is rebuilt here; ``[demo]`` needs a restart (said in the log line).

A removed static backend drains: no new sessions, and it leaves the pool when
its last one ends. A static backend whose url changed is a new backend; the
old one's sessions continue. Listeners are matched by their configured
address, so a port-0 listener keeps its port; a removed one stops accepting
and its open sessions continue. TLS contexts and the backend TLS context are
rebuilt on every reload, so renewed certificate files are picked up even when
the config itself did not change.
"""

import logging
import resource
from typing import NamedTuple

from glb import config, tls
from glb.admission import derived_max_connections
from glb.errors import ConfigError, HandlerLoadError
from glb.balancing import make_policy
from glb.events import EventBus
from glb.handlers import Handlers, swap_handlers
from glb.listeners import listener_name

log = logging.getLogger("glb.reload")

_RESTART_SECTIONS = ("demo",)  # read once at start-up: a change needs a restart


class Changes(NamedTuple):
    """What differs between two Settings; every field a sorted list of names."""

    settings: list          # "section.key" of every changed declared setting
    backends_added: list
    backends_removed: list
    backends_changed: list
    listeners_added: list   # listener names (glb.listeners.listener_name)
    listeners_removed: list
    handlers: list          # the handler modules of the new config (all imported afresh)

    def needs_restart(self):
        return [name for name in self.settings if name.partition(".")[0] in _RESTART_SECTIONS]

    def describe(self):
        """One line for the log."""
        parts = []
        if self.settings:
            parts.append("settings " + ", ".join(self.settings))
        for sign, names in (("+", self.backends_added), ("-", self.backends_removed),
                            ("~", self.backends_changed)):
            if names:
                parts.append(f"backends {sign}" + f" {sign}".join(names))
        for sign, names in (("+", self.listeners_added), ("-", self.listeners_removed)):
            if names:
                parts.append(f"listeners {sign}" + f" {sign}".join(names))
        parts.append("handlers " + (", ".join(self.handlers) or "none") + " imported afresh")
        restart = self.needs_restart()
        if restart:
            parts.append("needs a restart to apply: " + ", ".join(restart))
        return "; ".join(parts)


def _listener_names(settings):
    return ([listener_name("http", address) for address in settings.glb.listen]
            + [listener_name("https", address) for address in settings.tls.listen])


def diff(old, new):
    """The Changes from Settings ``old`` to ``new`` (no side effects)."""
    changed = []
    for section, declared in config.DECLARED.items():
        if section == config.PATTERN:
            continue
        for key in declared:
            if getattr(old.__dict__.get(section), key, None) != getattr(new.__dict__.get(section), key, None):
                changed.append(f"{section}.{key}")
    old_static = {backend.name: backend for backend in old.backends_static}
    new_static = {backend.name: backend for backend in new.backends_static}
    old_listeners, new_listeners = _listener_names(old), _listener_names(new)
    return Changes(
        settings=sorted(changed),
        backends_added=sorted(set(new_static) - set(old_static)),
        backends_removed=sorted(set(old_static) - set(new_static)),
        backends_changed=sorted(name for name in set(old_static) & set(new_static)
                                if any(getattr(old_static[name], key) != getattr(new_static[name], key)
                                       for key in config.DECLARED[config.PATTERN])),
        listeners_added=[name for name in new_listeners if name not in old_listeners],
        listeners_removed=[name for name in old_listeners if name not in new_listeners],
        handlers=list(new.handlers.modules),
    )


def check(path):
    """Load and check the config at ``path`` as ``--check`` does: ``(settings, Handlers)``.

    Raises ConfigError or HandlerLoadError with the same one-line message as at start-up.
    """
    settings = config.load(path)
    return settings, Handlers(settings.handlers.modules, settings, fresh=True)


class Plan:
    """A prepared reload: new things built and bound, old ones untouched until ``commit``."""

    def __init__(self, balancer, settings, handlers, changes):
        self.balancer, self.settings, self.handlers, self.changes = balancer, settings, handlers, changes
        self.contexts = {}       # listener name -> TLS context for every TLS listener of the new config
        self.new_servers = []    # bound, not accepting
        self.backend_context = None

    def abandon(self):
        for server in self.new_servers:
            server.close()
        self.new_servers = []

    def commit(self):
        """Apply the plan. Nothing here waits, so no greenlet sees half of it."""
        balancer, new, changes = self.balancer, self.settings, self.changes
        old = balancer.settings
        balancer.handler_receivers = swap_handlers(balancer.bus, balancer.handler_receivers, self.handlers)
        balancer.settings = new
        _apply_static_backends(balancer.registry, new, changes)
        if {"glb.balancing", "glb.hash_key"} & set(changes.settings):
            balancer.policy = make_policy(new.glb.balancing, hash_key=new.glb.hash_key)
        if old.glb.prefix != new.glb.prefix:
            _move_routes(balancer, old.glb.prefix, new.glb.prefix)
        balancer.__dict__.pop("_backend_ssl_context", None)
        if self.backend_context is not None:
            balancer._backend_ssl_context = self.backend_context
        if any(name.partition(".")[0] in ("http", "backends") or name in ("glb.protocols", "glb.prefix")
               for name in changes.settings):
            _replace_http_proxy(balancer)
        for server in list(balancer.servers):
            name = listener_name(server.scheme, server.configured)
            if name in changes.listeners_removed:
                server.close()
                balancer.servers.remove(server)
                log.info("= stopped listening on %s (open sessions continue)", name)
                continue
            if server.scheme == "https":
                server.context = self.contexts[name]
                server.handshake_timeout = new.glb.handshake_timeout
        for server in self.new_servers:
            balancer.start_listener(server)
        self.new_servers = []
        _apply_limits(balancer, new.glb, changes)
        _apply_rebalancing(balancer.rebalancer, new.glb)
        _apply_backend_defaults(balancer.registry, new.backends)
        if (changes.backends_added or changes.backends_removed or changes.backends_changed
                or any(name.startswith("backends.") for name in changes.settings)):
            _restart_health_checks(balancer)
        for hook in balancer.reload_hooks:  # state someone built from settings, rebuilt by its owner
            try:
                hook(old, new)
            except Exception:  # the reload is applied; one hook's bug must not hide that
                log.exception("! reload hook %r failed", hook)


def prepare(balancer, settings, handlers):
    """A Plan for ``settings`` with freshly imported ``handlers``; raises (having closed
    whatever it opened) ConfigError / HandlerLoadError for a bad TLS setup, OSError when a
    new listener cannot bind."""
    changes = diff(balancer.settings, settings)
    plan = Plan(balancer, settings, handlers, changes)
    staging = EventBus()  # TLS contexts come from the *new* handlers' ssl_* events
    handlers.connect(staging)
    file = settings.path or "<dict>"
    for address in settings.tls.listen:
        plan.contexts[listener_name("https", address)] = tls.listener_context(
            staging, settings.tls, tls.listener_name(address), file)
    if settings.backends.cafile or settings.backends.certfile:
        plan.backend_context = tls.backend_context(settings.backends, file)
    registry = balancer.registry
    for name in changes.backends_added:
        existing = registry.get(name)
        if existing is not None and not existing.static:
            raise ConfigError(f"a backend with guid {name!r} is registered over a control channel",
                              file, f"backend:{name}")
    try:
        for scheme, addresses in (("http", settings.glb.listen), ("https", settings.tls.listen)):
            for address in addresses:
                name = listener_name(scheme, address)
                if name in changes.listeners_added:
                    server = balancer.make_listener(scheme, address, plan.contexts.get(name))
                    server.init_socket()  # binds now: a busy port refuses the reload
                    plan.new_servers.append(server)
    except OSError as exc:
        plan.abandon()
        raise OSError(f"cannot listen on {name}: {exc.strerror or exc}") from None
    return plan


def reload(balancer, path):
    """Check the config at ``path`` and apply it; returns the Changes.

    Raises ConfigError / HandlerLoadError / OSError (the running config stays).
    """
    settings, handlers = check(path)
    for warning in handlers.warnings:
        log.warning("%s", warning)
    plan = prepare(balancer, settings, handlers)
    plan.commit()
    return plan.changes


def reload_and_log(balancer, path=None):
    """A reload as SIGHUP and ``POST <prefix>admin/reload`` do it: applied and said in one line,
    or refused with the start-up error line. ``(Changes, None)`` or ``(None, the reason)``."""
    path = path or balancer.settings.path
    try:
        changes = reload(balancer, path)
    except (ConfigError, HandlerLoadError, OSError) as exc:
        reason = f"glb: {exc}"
        log.error("! reload refused; still running the previous config: %s", reason)
        balancer.stats.reloads["refused"] += 1
        balancer.stats.last_reload_ok = False
        return None, reason
    balancer.stats.reloads["applied"] += 1
    balancer.stats.last_reload_ok = True
    logging.getLogger().setLevel(balancer.settings.glb.log_level.upper())
    log.info("= reloaded %s: %s", path, changes.describe())
    return changes, None


def _apply_static_backends(registry, new, changes):
    by_name = {backend.name: backend for backend in new.backends_static}
    for name in changes.backends_removed:
        backend = registry.get(name)
        if backend is not None and backend.static:
            registry.retire(name)
    for name in changes.backends_added + changes.backends_changed:
        static = by_name[name]
        existing = registry.get(name)
        values = dict(http=static.http, weight=static.weight, max_clients=static.max_clients,
                      max_fails=static.max_fails, fail_timeout=static.fail_timeout, slow_start=static.slow_start)
        if existing is not None and existing.static:
            registry.update_static(name, static.url, **values)
        else:
            registry.add_static(name, static.url, **values)


def _move_routes(balancer, old_prefix, new_prefix):
    """Routes under the old prefix (glb's own endpoints, whoever added them) move to the new one."""
    balancer.prefix = new_prefix
    for routes in (balancer.ws_routes, balancer.http_routes, balancer.http_prefix_routes):
        for path in [path for path in routes if path.startswith(old_prefix)]:
            routes[new_prefix + path[len(old_prefix):]] = routes.pop(path)


def _replace_http_proxy(balancer):
    """A new HTTP proxy from the new settings; the old one's pooled connections are closed
    (requests in flight finish on the connections they hold)."""
    old = balancer.http_proxy
    balancer.http_proxy = new = type(old)(balancer)
    new.clients = old.clients  # the open client connections, now served by the new one
    new.start()
    old.close()


def _apply_limits(balancer, glb, changes):
    """Connection limits, handshake rate and origins in place: open connections stay counted."""
    admission = balancer.admission
    limits, rate = admission.limits, admission.rate
    limits.max_per_ip = glb.max_connections_per_ip
    if "glb.max_connections" in changes.settings:
        limits.max_total = glb.max_connections or derived_max_connections(
            resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    rate.rate, rate.burst = glb.handshake_rate_per_ip, max(1, glb.handshake_burst_per_ip)
    admission.allowed_origins = frozenset(glb.allowed_origins)


def _apply_rebalancing(rebalancer, glb):
    rebalancer.automatic = glb.rebalance
    if glb.rebalance:
        rebalancer.watch_pool()
    rebalancer.threshold, rebalancer.rate, rebalancer.cooldown = (
        glb.rebalance_threshold, glb.rebalance_rate, glb.rebalance_cooldown)


def _apply_backend_defaults(registry, backends):
    """What backends registering from now on get; registered ones keep theirs."""
    registry.max_clients_reported, registry.max_bindings = backends.max_clients_reported, backends.max_bindings
    registry.max_fails, registry.fail_timeout, registry.slow_start = (
        backends.max_fails, backends.fail_timeout, backends.slow_start)


def _restart_health_checks(balancer):
    """Active checks follow the static backends of the new config; heartbeats its periods."""
    old = balancer.health
    balancer.health = type(old)(balancer)
    balancer.health.evictions = old.evictions
    old.stop()
    balancer.health.start()
