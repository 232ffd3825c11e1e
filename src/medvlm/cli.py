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
    help=(
        "Build, train, evaluate and serve biomedical vision-language assistants (LLaVA-Med / STLLaVA-Med). "
        f"{SHORT_NOTICE}"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (verb, module, name): name "app" adds the module's Typer sub-app; any other name registers that function as one
# command, with the module's NAME_SETTINGS if it has them (MAIN_SETTINGS for `main`) as app.command settings.
_VERBS: list[tuple[str, str, str]] = [  # in pipeline order, as `medvlm --help` lists them
    ("demo", "medvlm.demo", "main"),
    ("data", "medvlm.data.commands", "app"),
    ("instruct", "medvlm.data.instruct.commands", "app"),
    ("model", "medvlm.model.commands", "app"),
    ("train", "medvlm.eval.train_eval", "main"),  # evaluates an eval set after training (eval layer)
    ("prefs", "medvlm.infer.commands", "app"),
    ("eval", "medvlm.eval.commands", "app"),
    ("chat", "medvlm.serve.commands", "chat"),
    ("serve", "medvlm.serve.commands", "app"),
]


def _register() -> None:
    for verb, module, name in _VERBS:
        mod = importlib.import_module(module)
        if name == "app":
            app.add_typer(mod.app, name=verb)
        else:
            app.command(name=verb, **getattr(mod, f"{name.upper()}_SETTINGS", {}))(getattr(mod, name))


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
