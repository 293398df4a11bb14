"""Handler modules: plain modules whose ``on_<event>(event)`` functions receive events.

Listed under ``[handlers] modules``; loaded and checked at start-up (and by
``--check``). A function named ``on_<x>`` that matches no event is a warning
naming it, so a typo never silently does nothing.
"""

import importlib

from glb.errors import HandlerLoadError
from glb.events import EVENT_NAMES

PREFIX = "on_"


def inspect_module(module_name):
    """Import one handler module; return ``(module, {event: func}, [warnings])``."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise HandlerLoadError(f"handler module {module_name!r} cannot be imported: "
                               f"{type(exc).__name__}: {exc}") from exc
    functions, warnings = {}, []
    for attr in sorted(vars(module)):
        if not attr.startswith(PREFIX):
            continue
        func = getattr(module, attr)
        event = attr[len(PREFIX):]
        if event not in EVENT_NAMES:
            warnings.append(f"handler module {module_name!r}: {attr} matches no event "
                            f"(known events: see README)")
            continue
        if not callable(func):
            raise HandlerLoadError(f"handler module {module_name!r}: {attr} is not callable")
        functions[event] = func
    return module, functions, warnings


def load_handlers(module_names, bus):
    """Connect every listed module's handlers to ``bus``; return the warnings to log."""
    all_warnings = []
    for name in module_names:
        _, functions, warnings = inspect_module(name)
        all_warnings.extend(warnings)
        for event, func in functions.items():
            bus.add_handler(event, func, origin=name)
    return all_warnings
