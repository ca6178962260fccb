"""``parse_args`` for scripts and ``base_args`` for notebooks, both generated from ``modelscape.config.SCHEMA``."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from modelscape.config import ALIASES, BY_NAME, SCHEMA, ConfigError, close_matches, coerce, load_json, parse_bool, \
    parse_int
from modelscape.config import defaults as schema_defaults


def _converter(hp):
    if hp.type is bool:
        return _named(parse_bool, "bool")
    if hp.type is int:
        return _named(parse_int, "int")
    if hp.type is dict:
        return _named(json.loads, "JSON")
    return hp.type


def _named(fn, name):
    def conv(s):
        try:
            return fn(s)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"invalid {name} value: {s!r} ({e})")
    conv.__name__ = name
    return conv


def build_parser(defaults: dict | None = None, description: str | None = None,
                 parents=()) -> argparse.ArgumentParser:
    """The argparse parser: one ``--NAME`` flag per schema entry, grouped, defaults shown in ``--help``
    (a script's own ``defaults`` where it gives them), after the flags of ``parents`` (a script's own parsers)."""
    defaults = defaults or {}
    parser = argparse.ArgumentParser(
        description=description or "modelscape sweep hyperparameters",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep a script docstring as written
        parents=list(parents),
        allow_abbrev=False)  # --EMA_SMOOTH is a typo to report (as in a config), not a prefix of EMA_SMOOTHER
    groups = {}
    for hp in SCHEMA:
        if not hp.cli:
            continue
        group = groups.setdefault(hp.group, parser.add_argument_group(hp.group))
        flags = [f"--{hp.name}"] + [f"--{a}" for a in hp.aliases]  # --width, --depth: the original's flags
        kwargs = dict(dest=hp.name, type=_converter(hp), default=argparse.SUPPRESS, help=hp.help
                      + f" (default: {defaults.get(hp.name, hp.default)!r})")
        if hp.is_list or hp.sweepable:
            kwargs["nargs"] = "+"
        if hp.choices:
            kwargs["choices"] = hp.choices
        group.add_argument(*flags, **kwargs)
    return parser


def parse_args(argv=None, defaults: dict | None = None, description: str | None = None,
               parents=()) -> argparse.Namespace:
    """Parse command-line flags into a Namespace holding every hyperparameter (defaults filled in).

    Lists take several values (``--LOSS_CHECKPOINTS 0.1 0.05``); sweepable keys (N_SAMPLES, LR, DEPTH, WIDTH,
    GAMMA) always come back as lists of axis values (``--WIDTH 64 128 256``; ``[8192]`` by default), so
    ``iterators=[args.WIDTH, ...]`` works; a one-value list that is not swept reads as that value.
    ``--width``/``--depth`` are the original's spellings of ``--WIDTH``/``--DEPTH``. Ints accept ``1e5``;
    bools accept true/false. An unknown flag is an error that suggests the closest known names. ``defaults`` are a
    script's own defaults for some keys (``{"WIDTH": [64, 256], "MAX_ITER": 500}``): checked against the
    schema, shown by ``--help``, and overridden by flags on the command line. ``description`` heads ``--help``.

    ``parents`` are a script's own ``argparse.ArgumentParser(add_help=False)`` parsers (``--out`` ...): their
    flags are listed by ``--help`` and accepted, but their values are not hyperparameters and are left out of
    the Namespace returned; the script reads them with its own parser (``own.parse_known_args(argv)``).
    """
    script = {}
    for key, value in (defaults or {}).items():
        if key not in BY_NAME:
            close = close_matches(key)
            raise ConfigError(f"parse_args(defaults=...): {key!r} is not a hyperparameter"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        script[key] = coerce(key, value)
    parser = build_parser(script, description, parents)
    argv = sys.argv[1:] if argv is None else list(argv)
    ns, unknown = parser.parse_known_args(argv)
    for own in {a.dest for p in parents for a in p._actions}:
        vars(ns).pop(own, None)
    flags = [u.split("=")[0] for u in unknown if u.startswith("--")]
    if unknown:
        bad = flags[0] if flags else unknown[0]
        close = close_matches(bad.lstrip("-"))
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the list"
        parser.error(f"unknown argument {bad!r}{hint}")
    out = {**schema_defaults(), **script, **vars(ns)}
    for a, name in ALIASES.items():
        if a.upper() != name and any(arg == f"--{a}" or arg.startswith(f"--{a}=") for arg in argv):
            warnings.warn(f"flag --{a} is read as --{name}; please rename it", stacklevel=2)
    return Args(**_sweepables_as_lists(out))


def base_args() -> argparse.Namespace:
    """Every hyperparameter at its default, as a Namespace (for notebooks; same keys as ``parse_args``)."""
    return Args(**_sweepables_as_lists(schema_defaults()))


def _sweepables_as_lists(values: dict) -> dict:
    # As in the original, ``iterators = [args.N_SAMPLES, ...]`` must be a list of axis values even for one value;
    # a one-element list that is not swept reads as its value (config.coerce).
    return {k: (list(v) if isinstance(v, (list, tuple)) else [v]) if BY_NAME[k].sweepable else v
            for k, v in values.items()}


class Args(argparse.Namespace):
    """The Namespace ``parse_args``/``base_args`` return. The original's spellings (``args.width``,
    ``args.depth``, ``args.N_TRIAN`` ...) read and write the schema key, so ``vars(args)`` holds each key once."""


def _alias_property(name):
    return property(lambda self: getattr(self, name), lambda self, value: setattr(self, name, value))


for _alias, _name in ALIASES.items():
    setattr(Args, _alias, _alias_property(_name))


def int_from_any(x) -> int:
    """An int from '10000', '1e4' or '5.0' (the original's argparse type); ``argparse.ArgumentTypeError``
    otherwise."""
    try:
        return parse_int(x)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"invalid int: {x!r} ({e})") from None


def str2bool(v) -> bool:
    """True/False from a bool or yes/no/true/false/t/f/y/n/1/0 (the original's argparse type)."""
    try:
        return parse_bool(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}") from None


__all__ = ["parse_args", "base_args", "build_parser", "ConfigError", "Args", "int_from_any", "str2bool", "load_json"]
