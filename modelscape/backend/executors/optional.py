"""Optional packages (Ray, submitit, tensorboard) are imported only when asked for, with a one-line error naming
the extra."""
from __future__ import annotations

import importlib

from modelscape.config import ConfigError


def require(module: str, extra: str, executor: str | None = None, needed_by: str | None = None):
    """Import ``module``, or raise ConfigError saying which extra of modelscape provides it; the message names
    what needs it: ``EXECUTOR=executor``, or ``needed_by`` (e.g. ``"TENSORBOARD=True"``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        who = needed_by or f"EXECUTOR={executor!r}"
        raise ConfigError(f"{who} needs the package {module!r}, which is not installed: "
                          f"pip install modelscape[{extra}]") from None
