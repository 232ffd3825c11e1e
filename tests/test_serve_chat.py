"""Interactive ``medvlm chat`` driven through a pseudo-terminal: streaming, multi-turn history, /image, /reset."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from medvlm.data.images import load_image
from medvlm.infer.engine import GenerationSettings
from medvlm.serve.api import load_engine
from medvlm.serve.chat import ChatSession
from serve_helpers import tiny_checkpoint


class Terminal:
    """A child process on a pty; ``expect`` reads until a marker appears (bounded by a timeout)."""

    def __init__(self, cmd: list[str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True, env={**os.environ, "TERM": "dumb"}
        )
        os.close(slave)
        self.buffer = ""

    def expect(self, marker: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {marker!r}; got:\n{self.buffer[-2000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.buffer += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


def _answer(transcript: str) -> str:
    """The text after 'ASSISTANT: ' up to the end of the line (the pty turns \\n into \\r\\n)."""
    return transcript.split("ASSISTANT: ", 1)[1].replace("\r\n", "\n").split("\n")[0].strip()


def test_interactive_chat_over_a_pty(tmp_path_factory, shared_dir: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path_factory)
    first, second = shared_dir / "images" / "synpic42202.jpg", shared_dir / "images" / "bio_patch.png"
    engine = load_engine(str(checkpoint))
    settings = GenerationSettings(max_new_tokens=10)
    # Expected answers from the library session (the same history handling, without a terminal).
    ref = ChatSession(engine, settings, [load_image(first)])
    e1, e2 = ref.ask("What is shown?"), ref.ask("Anything abnormal?")
    ref.reset([load_image(second)])
    e3 = ref.ask("What is shown?")
    ref.reset()
    e4 = ref.ask("What is shown?")
    assert e1 and e3 == e4
    assert len(ref.history) == 2 and ref.history[0].num_images == 1

    term = Terminal(
        [
            sys.executable,
            "-m",
            "medvlm",
            "chat",
            "--model",
            str(checkpoint),
            "--image",
            str(first),
            "--max-new-tokens",
            "10",
        ]
    )
    try:
        banner = term.expect("USER: ")
        assert "research use only" in banner and "/image FILE" in banner
        term.send("What is shown?")
        assert _answer(term.expect("USER: ")) == e1  # the whole answer, not one word
        term.send("Anything abnormal?")
        assert _answer(term.expect("USER: ")) == e2  # the first turn (with its image) is in the history
        term.send(f"/image {second}")
        assert "new conversation about bio_patch.png" in term.expect("USER: ")
        term.send("What is shown?")
        assert _answer(term.expect("USER: ")) == e3
        term.send("/image /nonexistent.png")
        assert "error: /nonexistent.png: image file not found" in term.expect("USER: ")
        term.send("/reset")
        term.expect("USER: ")
        term.send("What is shown?")
        assert _answer(term.expect("USER: ")) == e4
        term.send("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_session_streams_deltas_that_add_up(tmp_path_factory, shared_dir: Path) -> None:
    engine = load_engine(str(tiny_checkpoint(tmp_path_factory)))
    session = ChatSession(
        engine, GenerationSettings(max_new_tokens=12), [load_image(shared_dir / "images" / "xy_chromosome.jpg")]
    )
    deltas: list[str] = []
    answer = session.ask("Describe it.", on_delta=deltas.append)
    assert "".join(deltas) == answer and len(deltas) > 1
    assert [m.role for m in session.history] == ["user", "assistant"]
