"""One chunk of a multi-process ``medvlm eval vqa`` run, executed in its own subprocess.

``python -m medvlm.eval.tasks JOB.json [--progress]``: JOB is a :class:`medvlm.eval.vqa.ChunkJob`; the
subprocess sets its torch thread count, loads the model, and appends the answers of its questions to
its own part file (per batch, so an interrupted run resumes). The parent merges the parts in order.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medvlm.errors import MedvlmError
from medvlm.utils.io import read_json


def run_chunk(job_path: str | Path, progress: bool = False) -> int:
    """Answer one chunk job; returns the number of answers written."""
    import torch

    from medvlm.eval.vqa import ChunkJob, answer_into, load_engine, progress_bar, read_questions
    from medvlm.infer.engine import GenerationSettings

    job = ChunkJob(**read_json(job_path))
    torch.set_num_threads(job.threads)
    settings = dict(job.settings)
    settings["stop"] = tuple(settings.get("stop") or ())
    gen = GenerationSettings(**settings).validate()
    wanted = set(job.keys)
    questions = [q for q in read_questions(job.questions, job.format) if q.key in wanted]
    if len(questions) != len(wanted):
        raise MedvlmError(f"{job.questions}: {len(wanted) - len(questions)} question(s) of the chunk are gone")
    engine = load_engine(job.model, job.batch_size, int(job.extra.get("self_question", 0)))
    bar = progress_bar(len(questions), progress)
    n = answer_into(
        engine, questions, job.out, gen, job.model_id, job.batch_size, job.image_folder, on_batch=bar.update
    )
    bar.close()
    return n


def main(argv: list[str] | None = None) -> None:
    """Entry point of the chunk subprocess; a MedvlmError prints ``error: ...`` and exits 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    progress = "--progress" in args
    args = [a for a in args if a != "--progress"]
    if len(args) != 1:
        sys.stderr.write("usage: python -m medvlm.eval.tasks JOB.json [--progress]\n")
        sys.exit(2)
    try:
        run_chunk(args[0], progress)
    except MedvlmError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
