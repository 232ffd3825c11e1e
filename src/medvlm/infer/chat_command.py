"""``medvlm chat``: ask a medvlm checkpoint one question about one or more images; prints only the answer."""

from __future__ import annotations

from pathlib import Path

import typer

from medvlm.data.schema import IMAGE_PLACEHOLDER, Message, Sample
from medvlm.errors import MedvlmError


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


def main(
    model: Path = typer.Option(..., "--model", help="A medvlm checkpoint folder."),
    image: list[str] = typer.Option([], "--image", help="Image file (repeatable; relative to --image-folder if given)."),
    prompt: str | None = typer.Option(None, "--prompt", help="The question. Put <image> where an image goes (default: images first)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Upper bound on answer tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (deterministic)."),
    image_folder: Path | None = typer.Option(None, "--image-folder", help="Folder that relative --image paths are in."),
) -> None:
    """Answer one question about image(s) with a medvlm model and print the answer (research use only)."""
    if prompt is None:
        raise MedvlmError("--prompt is required (interactive chat is not available in this version)")
    from medvlm.infer.engine import GenerationSettings, InferenceEngine
    from medvlm.model.build import load_pretrained

    sample = build_chat_sample(prompt, image)
    m, processor = load_pretrained(model)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    answer = InferenceEngine(m, processor).generate([sample], settings, image_folder=image_folder)[0]
    typer.echo(answer)
