"""Handler modules: plain modules whose ``on_<event>(event)`` functions receive events.

Listed under ``[handlers] modules``; loaded and checked at start-up (and by
``--check``). A function named ``on_<x>`` that matches no event is a warning
naming it, so a typo never silently does nothing.

A module that takes settings defines ``configure(section)``: it is called once
per Balancer with the module's settings (the config section named after the
module, declared in ``glb.config`` like every other setting; None when it has
none) and returns the object whose ``on_<event>`` methods are the handlers.
Several balancers in one process each get their own object.
"""

import importlib

from glb.errors import HandlerLoadError
from glb.events import EVENT_NAMES

PREFIX = "on_"


def inspect_module(module_name, settings=None):
    """Import one handler module; return ``(module, {event: func}, [warnings])``.

    For a module with ``configure``, the functions are those of the object it returns
    for ``settings`` (its section of a ``glb.config.Settings``; defaults when None).
    """
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise HandlerLoadError(f"handler module {module_name!r} cannot be imported: "
                               f"{type(exc).__name__}: {exc}") from exc
    source = module
    configure = getattr(module, "configure", None)
    if configure is not None:
        if settings is None:
            from glb.config import Settings
            settings = Settings.defaults()
        try:
            source = configure(settings.handler_settings(module_name))
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


def load_handlers(module_names, bus, settings=None):
    """Connect every listed module's handlers to ``bus``; return the warnings to log."""
    all_warnings = []
    for name in module_names:
        _, functions, warnings = inspect_module(name, settings)
        all_warnings.extend(warnings)
        for event, func in functions.items():
            bus.add_handler(event, func, origin=name)
    return all_warnings
