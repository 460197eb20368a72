"""The ``conceptlab`` command line: one subcommand per capability.

Each capability registers its subcommands from its own module (listed in ``_COMMAND_MODULES``), which
defines ``register(subparsers)``; every subparser sets ``func(args) -> int``. Errors a user can fix are
raised as :class:`CLIError` (or ``ValueError`` / ``FileNotFoundError`` / ``OSError``): they are printed to
stderr as ``conceptlab: error: ...`` with exit code 2 (1 for other failures), never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from . import __version__

# module (relative to this package) -> provides register(subparsers)
_COMMAND_MODULES = (
    ".metrics.palette_cli",           # palette
    ".metrics.captions_cli",          # audit-captions
    ".metrics.diff_cli",              # diff, diff-compare
    ".training.merge.cli",            # merge
    ".training.lora.train_cli",       # train
    ".training.esd.cli",              # erase
    ".training.esd.uce_cli",          # uce, erase-convert
    ".training.lora.extract_cli",     # extract-lora, resize-lora
    ".training.lora.quickstart_cli",  # quickstart
)


#: subcommand -> the module that registers it, so ``conceptlab <command> ...`` imports only that capability
#: (``conceptlab palette --help`` starts without torch); a command missing here makes the parser import every
#: module of ``_COMMAND_MODULES`` (always correct, only slower).
_COMMAND_OWNERS = {
    "palette": ".metrics.palette_cli",
    "palette-summary": ".metrics.palette_cli",
    "audit-captions": ".metrics.captions_cli",
    "diff": ".metrics.diff_cli",
    "diff-compare": ".metrics.diff_cli",
    "merge": ".training.merge.cli",
    "train": ".training.lora.train_cli",
    "erase": ".training.esd.cli",
    "quickstart": ".training.lora.quickstart_cli",
}


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


def _command_of(argv: list[str] | None) -> str | None:
    """The subcommand named in ``argv`` (first argument not starting with '-'), or None."""
    for a in (sys.argv[1:] if argv is None else argv):
        if not a.startswith("-"):
            return a
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser. With ``command`` known to :data:`_COMMAND_OWNERS`, only its module is
    imported and registered (fast start, no torch for the metrics commands); otherwise every capability's
    subcommands are registered."""
    parser = argparse.ArgumentParser(
        prog="conceptlab",
        description="Concept Lab: LoRA training, ESD erasure, merging, weight diffs and pixel-art palette metrics.",
    )
    parser.add_argument("--version", action="version", version=f"conceptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    owner = _COMMAND_OWNERS.get(command) if command else None
    for mod_name in ((owner,) if owner else _COMMAND_MODULES):
        try:
            mod = import_module(mod_name, __package__)
        except ModuleNotFoundError as exc:  # capability not built yet
            if exc.name and exc.name.endswith(mod_name.rsplit(".", 1)[-1]):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 ok, 1 failure, 2 usage / input error)."""
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError) as exc:
        print(f"conceptlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"conceptlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one clear line, not a traceback
        print(f"conceptlab {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
