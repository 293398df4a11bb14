"""Handler modules: plain modules whose ``on_<event>(event)`` functions receive events.

Listed under ``[handlers] modules``; loaded and checked at start-up (and by
``--check``). A function named ``on_<x>`` that matches no event is a warning
naming it, so a typo never silently does nothing.

A module that takes settings defines ``configure(section)``: it is called once
per Balancer with the module's settings (the config section named after the
module; None when it has none) and returns the object whose ``on_<event>``
methods are the handlers. Several balancers in one process each get their own
object. glb's bundled modules declare their settings in ``glb.config``; any other
module declares them in a module-level ``SETTINGS`` tuple of ``glb.config.Setting``
rows whose section is the module's name, checked when the config is loaded.

On reload the listed modules are imported afresh from their source (the
modules they import are not): ``Handlers(..., fresh=True)`` builds the
new module objects without touching the running ones, and only once every
module has loaded does ``swap_handlers`` replace the old receivers with the new
ones, in one step with no yield in between.
"""

import importlib
import importlib.machinery
import importlib.util
import sys

from glb.errors import HandlerLoadError
from glb.events import EVENT_NAMES

PREFIX = "on_"


def inspect_module(module_name, settings=None, fresh=False):
    """Import one handler module; return ``(module, {event: func}, [warnings])``.

    For a module with ``configure``, the functions are those of the object it returns
    for ``settings`` (its section of a ``glb.config.Settings``; defaults when None).
    ``fresh``: execute the module's current source into a new module object (not yet
    in ``sys.modules``), whether or not it was imported before.
    """
    try:
        module = _import_fresh(module_name) if fresh else importlib.import_module(module_name)
    except Exception as exc:
        raise HandlerLoadError(f"handler module {module_name!r} cannot be imported: "
                               f"{type(exc).__name__}: {exc}") from exc
    source = module
    configure = getattr(module, "configure", None)
    if configure is not None:
        from glb import config  # the settings machinery, only for modules that take settings

        section = (settings or config.Settings.defaults()).handler_settings(module_name)
        try:
            if section is None:
                section = config.module_defaults(module)  # its own SETTINGS, none given in the file
            source = configure(section)
        except Exception as exc:
            raise HandlerLoadError(f"handler module {module_name!r}: configure() failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
    functions, warnings = {}, []
    for attr in sorted(dir(source) if source is not module else vars(module)):
        if not attr.startswith(PREFIX):
            continue
        func = getattr(source, attr)
        if func is None:  # a configured object turned this handler off
            continue
        event = attr[len(PREFIX):]
        if event not in EVENT_NAMES:
            warnings.append(f"handler module {module_name!r}: {attr} matches no event "
                            f"(known events: see README)")
            continue
        if not callable(func):
            raise HandlerLoadError(f"handler module {module_name!r}: {attr} is not callable")
        functions[event] = func
    return module, functions, warnings


def _import_fresh(module_name):
    """A new module object run from the module's source as it is on disk now (no cached bytecode)."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {module_name!r}")
    if isinstance(spec.loader, importlib.machinery.SourceFileLoader):
        # The bytecode cache trusts the file's mtime in whole seconds: an edit within the
        # same second would run the old code.
        spec.loader = _SourceOnlyLoader(spec.loader.name, spec.loader.path)
    module = importlib.util.module_from_spec(spec)
    running = sys.modules.get(module_name)
    sys.modules[module_name] = module  # as during any import: the module may look itself up
    try:
        spec.loader.exec_module(module)
    finally:  # the running module stays the one import finds until the reload is committed
        if running is None:
            del sys.modules[module_name]
        else:
            sys.modules[module_name] = running
    return module


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):
        return self.source_to_code(self.get_data(self.path), self.path)


class Handlers:
    """Handler functions imported from the listed modules (configured with ``settings``),
    not yet connected to any bus."""

    def __init__(self, module_names, settings=None, fresh=False):
        self.module_names = list(module_names)
        self.modules = {}  # name -> module object
        self.functions = []  # (module name, event, function), in load order
        self.warnings = []
        for name in self.module_names:
            module, functions, warnings = inspect_module(name, settings, fresh=fresh)
            self.modules[name] = module
            self.warnings.extend(warnings)
            self.functions.extend((name, event, func) for event, func in functions.items())

    def connect(self, bus):
        """Connect every function to ``bus``; returns the receivers (for ``swap_handlers``)."""
        return [(event, bus.add_handler(event, func, origin=name)) for name, event, func in self.functions]

    def publish(self):
        """Make the freshly imported module objects the ones ``import`` finds from now on."""
        sys.modules.update(self.modules)


def swap_handlers(bus, old_receivers, handlers):
    """Replace ``old_receivers`` by ``handlers``' functions at once; returns the new receivers.

    Connecting and disconnecting never yields, so no event sees a mix of the two sets.
    """
    new_receivers = handlers.connect(bus)
    for event, receiver in old_receivers:
        bus.remove_handler(event, receiver)
    handlers.publish()
    return new_receivers


def load_handlers(module_names, bus, settings=None):
    """Connect every listed module's handlers to ``bus``; return the warnings to log."""
    return load_handler_receivers(module_names, bus, settings)[1]


def load_handler_receivers(module_names, bus, settings=None):
    """Connect every listed module's handlers to ``bus``; ``(receivers, warnings)``."""
    handlers = Handlers(module_names, settings)
    return handlers.connect(bus), handlers.warnings
