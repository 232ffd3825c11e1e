"""The one ``medvlm`` command: a verb per function.

Each verb group lives beside the code it drives (``medvlm/<area>/commands.py``) and only calls
library functions, so everything the CLI does is also callable from Python. Heavy imports (torch,
transformers) happen inside the commands, so ``medvlm --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from medvlm.errors import MedvlmError
from medvlm.notice import SHORT_NOTICE

app = typer.Typer(
    name="medvlm",
    help=f"Build, train, evaluate and serve biomedical vision-language assistants (LLaVA-Med / STLLaVA-Med). {SHORT_NOTICE}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (verb, module, kind): kind "group" adds a Typer sub-app; "command" registers a single function `main`.
_VERBS: list[tuple[str, str, str]] = [  # in pipeline order, as `medvlm --help` lists them
    ("demo", "medvlm.demo", "command"),
    ("data", "medvlm.data.commands", "group"),
    ("instruct", "medvlm.data.instruct.commands", "group"),
    ("model", "medvlm.model.commands", "group"),
    ("train", "medvlm.eval.train_eval", "command"),  # evaluates an eval set after training (eval layer)
    ("prefs", "medvlm.infer.prefs_commands", "group"),
    ("eval", "medvlm.eval.commands", "group"),
    ("chat", "medvlm.serve.chat", "command"),
    ("serve", "medvlm.serve.commands", "group"),
]


def _register() -> None:
    for verb, module, kind in _VERBS:
        mod = importlib.import_module(module)
        if kind == "group":
            app.add_typer(mod.app, name=verb)
        else:
            app.command(name=verb, **getattr(mod, "COMMAND_SETTINGS", {}))(mod.main)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; a :class:`MedvlmError` prints ``error: ...`` and exits 2."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        app(args=argv, standalone_mode=True)
    except MedvlmError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
