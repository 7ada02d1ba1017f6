"""What every Synapse command shares: common flags and the start-up sequence.

``bootstrap`` loads the settings, and on a bad configuration prints one line to stderr and
exits with status 2 (no traceback), then sets up logging with the secrets redacted.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, TypeVar

import pydantic

from synapse_common import logs, settings

EXIT_CONFIG = 2
ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--config", metavar="PATH",
                       help="YAML config file (default: $SYNAPSE_CONFIG_PATH, else "
                            f"{settings.DEFAULT_CONFIG_PATH}); SYNAPSE_<SECTION>__<FIELD> "
                            "environment variables override single values")
    group.add_argument("--log-format", choices=("human", "json"), default=None,
                       help="log line format (default: human)")
    group.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                       default=None, help="log level (default: info)")


def fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    print(f"{message}", file=sys.stderr)
    raise SystemExit(code)


def bootstrap(model: type[ModelT], args: argparse.Namespace,
              overrides: dict[str, object] | None = None,
              secret_env: set[str] | None = None) -> ModelT:
    """Load settings (exit 2 on error) and configure logging.

    ``overrides`` are values from command-line flags, as dotted paths, applied after the
    file and the environment. ``secret_env`` is given the names of the variables secrets
    were read from (``{env: NAME}``).
    """
    try:
        loaded = settings.load(model, getattr(args, "config", None), secret_env=secret_env)
        if overrides:
            loaded = settings.override(loaded, overrides)
    except settings.ConfigError as exc:
        fail(f"config error: {exc}")
        raise  # unreachable; for type checkers
    log_cfg = getattr(loaded, "logging", None)
    fmt = str(getattr(args, "log_format", None) or getattr(log_cfg, "format", "human"))
    level = str(getattr(args, "log_level", None) or getattr(log_cfg, "level", "info"))
    logs.setup(fmt=fmt, level=level, secrets=settings.secret_values(loaded))
    return loaded
