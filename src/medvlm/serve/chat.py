"""The logic of ``medvlm chat`` (the verb is in :mod:`medvlm.serve.commands`): one question with
``--prompt`` (prints only the answer), or an interactive session.

Interactive (no ``--prompt``): multi-turn, answers stream token by token and end on the chat
template's stop (EOS / stop string, not after the first word as LLaVA v1.5's CLI did); the whole
history is sent each turn, images stay attached to the turn they were given with. Commands:
``/image FILE`` starts a new conversation about another image (LLaVA-Med conversations have one image),
``/reset`` starts over with the same image(s), ``/exit`` (or Ctrl-D) quits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from medvlm.data.schema import IMAGE_PLACEHOLDER, Message, Sample, image_part, text_part
from medvlm.errors import MedvlmError
from medvlm.notice import NOTICE

HELP_TEXT = "Commands: /image FILE (new conversation about FILE), /reset (start over), /exit (or Ctrl-D)."


def build_chat_sample(prompt: str, images: list[str]) -> Sample:
    """A one-turn Sample: ``<image>`` placeholders in ``prompt`` mark image positions; without any,
    the images go first (LLaVA's ``"<image>\\n" + question``)."""
    text = prompt
    if images and IMAGE_PLACEHOLDER not in prompt:
        text = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + prompt
    message = Message.from_text("user", text)
    sample = Sample(id="chat", messages=[message], images=list(images))
    if sample.num_image_parts != len(images):
        raise MedvlmError(
            f"--prompt has {sample.num_image_parts} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} --image given"
        )
    return sample


class ChatSession:
    """A multi-turn conversation with an engine; images are attached to the first turn after they are set."""

    def __init__(self, engine, settings, images: list | None = None):
        self.engine, self.settings = engine, settings
        self.images: list = list(images or [])
        """PIL images of the current conversation, in the order their parts appear."""
        self.history: list[Message] = []
        self._pending = len(self.images)  # images not yet attached to a user turn

    def reset(self, images: list | None = None) -> None:
        """Start a new conversation (with new images, or the current ones)."""
        if images is not None:
            self.images = list(images)
        self.history = []
        self._pending = len(self.images)

    def ask(self, text: str, on_delta: Callable[[str], None] | None = None) -> str:
        """Send one user turn, stream the answer (deltas to ``on_delta``), keep both in the history."""
        parts = [image_part() for _ in range(self._pending)] + [text_part(text)]
        message = Message(role="user", content=parts)
        sample = Sample(
            id="chat", messages=[*self.history, message], images=[f"image{i}" for i in range(len(self.images))]
        )
        answer = ""
        for delta in self.engine.stream(sample, self.settings, images=self.images):
            answer += delta
            if on_delta is not None:
                on_delta(delta)
        self.history += [message, Message(role="assistant", content=[text_part(answer)])]
        self._pending = 0
        return answer


def interactive_chat(
    engine,
    settings,
    images: list,
    *,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
    image_folder: Path | None = None,
) -> None:
    """Run the interactive loop until ``/exit`` or end of input."""
    from medvlm.data.images import load_image

    def out(s: str) -> None:
        if write is not None:
            write(s)
        else:
            sys.stdout.write(s)
            sys.stdout.flush()

    session = ChatSession(engine, settings, images)
    out(f"{NOTICE}\n{HELP_TEXT}\n")
    while True:
        try:
            line = read("USER: ").strip()
        except (EOFError, KeyboardInterrupt):
            out("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            out("(new conversation)\n")
            continue
        if line.startswith("/image"):
            arg = line[len("/image") :].strip()
            path = Path(arg) if Path(arg).is_absolute() or image_folder is None else image_folder / arg
            try:
                if not arg:
                    raise MedvlmError("usage: /image FILE")
                session.reset([load_image(path)])
            except MedvlmError as e:
                out(f"error: {e}\n")
                continue
            out(f"(new conversation about {path.name})\n")
            continue
        if line.startswith("/"):
            out(f"unknown command {line.split()[0]}. {HELP_TEXT}\n")
            continue
        out("ASSISTANT: ")
        try:
            session.ask(line, on_delta=out)
        except MedvlmError as e:
            out(f"\nerror: {e}\n")
            continue
        out("\n")
