"""Renamed CLI spellings: the one mechanism every verb uses to keep an old option name for one release.

A command built with ``cls=renamed({...})`` accepts each old spelling as a hidden alias: the old flag is
rewritten to the new one before typer (click) parses the line, and one ``warning: ... deprecated ...`` line naming
the new spelling goes to stderr. ``--help`` shows only the new spellings. A positional argument that became
an option (``SRC DST`` -> ``SRC --out DST``) stays a hidden ``typer.Argument`` that the command ignores: its
value is handed to the option (the body reads only the option).
"""

from __future__ import annotations

from typing import Any, ClassVar

import typer
from typer.core import TyperCommand

__all__ = ["RenamedCommand", "deprecation_line", "renamed"]


def deprecation_line(command_path: str, old: str, new: str) -> str:
    """The one stderr line printed when a deprecated spelling is used."""
    return f"warning: `{command_path} {old}` is deprecated and will be removed in the next release; use {new}"


class RenamedCommand(TyperCommand):
    """A typer command that accepts old option spellings (see :func:`renamed`)."""

    renamed_options: ClassVar[dict[str, str]] = {}
    """Old flag -> its replacement, e.g. ``{"--model-name": "--served-model-name"}``; a replacement may carry a
    value (``{"--json": "--out -"}``) when an old flag became an option with a value."""
    renamed_positional: ClassVar[dict[str, str]] = {}
    """Name of a hidden positional parameter -> the option that replaces it, e.g. ``{"dst": "--out"}``."""

    def _option(self, flag: str) -> Any:
        for param in self.params:
            if flag in getattr(param, "opts", ()) or flag in getattr(param, "secondary_opts", ()):
                return param
        raise RuntimeError(f"{self.name}: renamed to {flag}, which the command does not declare")

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        """Rewrite old flags, parse, then move deprecated positional values to their options."""
        rewritten: list[str] = []
        warned: set[str] = set()
        for i, tok in enumerate(args):
            if tok == "--":  # everything after is a value
                rewritten += args[i:]
                break
            old, eq, value = tok.partition("=")
            new = self.renamed_options.get(old)
            if new is None:
                rewritten.append(tok)
                continue
            if old not in warned:
                typer.echo(deprecation_line(ctx.command_path, old, new), err=True)
                warned.add(old)
            rewritten += new.split()
            if eq:
                rewritten[-1] += "=" + value
        if self.renamed_positional:
            # A first, raw pass (no conversion, no checks) shows whether a deprecated positional was given.
            raw, _, _ = self.make_parser(ctx).parse_args(args=list(rewritten))
            for name, flag in self.renamed_positional.items():
                value = raw.get(name)
                if not isinstance(value, str):
                    continue
                if self._option(flag).name in raw:
                    raise typer.BadParameter(
                        f"give {flag} only ({name.upper()} is its deprecated positional spelling)",
                        ctx=ctx,
                        param=self._option(flag),
                    )
                typer.echo(
                    deprecation_line(ctx.command_path, f"{name.upper()} (positional)", f"{flag} {name.upper()}"),
                    err=True,
                )
                rewritten = [flag, value, *rewritten]  # in front: a `--` in the line would make it positional
        rest = super().parse_args(ctx, rewritten)
        for name in self.renamed_positional:
            ctx.params[name] = None  # its value went to the option
        return rest

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        """The usage line without the deprecated positionals."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.name not in self.renamed_positional:
                pieces += param.get_usage_pieces(ctx)
        return pieces


def renamed(options: dict[str, str] | None = None, positional: dict[str, str] | None = None) -> type[RenamedCommand]:
    """A command class for ``app.command(cls=...)`` that keeps the given old spellings as hidden aliases."""
    attrs: dict[str, Any] = {"renamed_options": dict(options or {}), "renamed_positional": dict(positional or {})}
    return type("Renamed", (RenamedCommand,), attrs)
