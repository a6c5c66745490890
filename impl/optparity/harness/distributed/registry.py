"""The kinds: every module in harness/distributed/kinds/ that defines DRIVERS (a tuple of
base.Driver instances). Adding a kind = adding one module there."""
from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from optparity.harness.distributed.base import Driver


@functools.lru_cache(maxsize=None)
def drivers() -> dict[str, Driver]:
    from optparity.harness.distributed import kinds

    found: dict[str, Driver] = {}
    for info in sorted(pkgutil.iter_modules(kinds.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{kinds.__name__}.{info.name}")
        for d in getattr(module, "DRIVERS", ()):
            if d.kind in found:
                raise RuntimeError(f"kind {d.kind!r} is defined twice ({module.__name__})")
            found[d.kind] = d
    return found


def kinds() -> list[str]:
    return sorted(drivers())


def driver(kind: str) -> Driver:
    try:
        return drivers()[kind]
    except KeyError:
        raise ValueError(f"unknown --kind {kind!r}; known: {', '.join(kinds())}") from None


def detect(obj: Any) -> str:
    """The one kind whose driver recognises `obj`'s signature; ValueError when none or several do."""
    hits = {k: why for k, d in drivers().items() if (why := d.detect(obj))}
    name = getattr(obj, "__qualname__", repr(obj))
    if len(hits) == 1:
        return next(iter(hits))
    if not hits:
        raise ValueError(f"cannot tell which distributed kind {name} is: it looks like none of "
                         f"{', '.join(kinds())}; pass --kind")
    reasons = "; ".join(f"{k}: {why}" for k, why in sorted(hits.items()))
    raise ValueError(f"{name} could be any of several kinds ({reasons}); pass --kind with one of {', '.join(sorted(hits))}")
