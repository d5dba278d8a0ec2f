"""cli layer: entry point; each verb group lives in its own module and registers itself here.

Exit codes follow go-sev-guest's ``tools/check``: 0 success, 1 usage or unreadable/malformed input,
2 signature/chain/binding verification failed, 5 only policy failed, 3 any other runtime failure.
A user never sees a traceback: every ``CvmError`` becomes one line on stderr and its exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from cvmotion.errors import AbiError, CvmError, PolicyViolation, UsageError, VerificationError

__all__ = ["EXIT_OK", "EXIT_POLICY", "EXIT_RUNTIME", "EXIT_USAGE", "EXIT_VERIFY", "exit_code_for", "main"]

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_VERIFY = 2
EXIT_RUNTIME = 3
EXIT_POLICY = 5

# Verb groups, each a module in this package exposing ``register(subparsers)``. Imported lazily inside
# handlers, so `cvmotion --help` does not pay for unicorn, uvicorn or cryptography.
_GROUPS = (
    "attest", "platform", "vm", "host", "migrate", "attestation", "demo", "kds", "pool",
    "controller", "policy", "deployment", "simulate",
    "webhook", "maintenance",
)  # fmt: skip

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; our contract reserves 2 for verification failures."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def exit_code_for(exc: CvmError) -> int:
    """Map an error class to the CLI exit code."""
    if isinstance(exc, (UsageError, AbiError)):
        return EXIT_USAGE
    if isinstance(exc, VerificationError):
        return EXIT_VERIFY
    if isinstance(exc, PolicyViolation):
        return EXIT_POLICY
    return EXIT_RUNTIME


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cvmotion", description="Confidential live migration for SEV-SNP-style VMs.")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", parser_class=_Parser)
    for name in _GROUPS:
        try:
            module = importlib.import_module(f"cvmotion.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cvmotion.cli.{name}":
                raise
            continue
        module.register(sub)
    if "demo" in sub.choices:  # ``demo maintenance``: its own module, a sub-command of ``demo``
        from cvmotion.cli.demo_maintenance import register_demo_maintenance

        register_demo_maintenance(sub.choices["demo"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except CvmError as exc:
        print(f"cvmotion: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("cvmotion: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"cvmotion: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) else 3
