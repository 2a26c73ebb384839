"""Name -> solver registry, so that methods are chosen by name rather than if/elif chains."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    """A registered solver.

    Args:
        name: the --method name.
        solve: ``solve(W, H, grid, *, order, block, damp, xp, kernel) -> Result``.
        default_order: the column order used when --order is not given (None: no order).
        uses_hessian: False for RTN, which needs no calibration data.
    """

    name: str
    solve: Callable
    default_order: str | None
    uses_hessian: bool = True


METHODS: dict[str, Method] = {}


def register(name: str, *, default_order: str | None = None, uses_hessian: bool = True):
    """Decorator: register a solver function under ``name``."""
    def wrap(fn):
        METHODS[name] = Method(name, fn, default_order, uses_hessian)
        return fn
    return wrap
