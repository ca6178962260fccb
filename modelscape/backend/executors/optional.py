"""Optional backends (Ray, submitit) are imported only when asked for, with a one-line error naming the extra."""
from __future__ import annotations

import importlib

from modelscape.config import ConfigError


def require(module: str, extra: str, executor: str):
    """Import ``module``, or raise ConfigError saying which extra of modelscape provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"EXECUTOR={executor!r} needs the package {module!r}, which is not installed: "
                          f"pip install modelscape[{extra}]") from None
