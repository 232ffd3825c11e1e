"""``medvlm eval vqa``: answer a VQA test file with a medvlm model, batched, resumable, optionally in K processes.

Reads the converted VQA format (``id``, ``image``, ``conversations``) or qa50-style JSONL (``question_id``,
``text``, ``image``); the question is the first human turn without the ``<image>`` placeholder, and the
model sees ``<image>\\n`` + question (LLaVA-Med's ``model_vqa``). Answers are written in the original answer
format (``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``), in question order,
with a ``decoding.json`` beside them describing the run.

Questions about the same image are answered together: the engine prefills each image prefix once and
reuses its KV cache for every question on it, decoding continuously (rows join as others finish).
Resumable: answers are appended per chunk (4 batches), so a killed run loses at most one chunk; a rerun keeps every
complete line (a torn last line is dropped), answers only the missing questions and rewrites the file in
question order at the end. ``processes > 1`` splits the missing questions into K contiguous chunks answered
by K subprocesses (each with ``cores / K`` torch threads, LLaVA's ``--num-chunks``) and merges them in order;
under greedy decoding the file equals a single-process run's, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medvlm.data.readers import iter_typed_records
from medvlm.data.readers.formats import convert_record
from medvlm.data.schema import Message, Sample
from medvlm.errors import MedvlmError
from medvlm.utils.artifacts import DECODING_FILE
from medvlm.utils.io import read_json, write_json_atomic, write_text_atomic

ANSWER_FIELDS: tuple[str, ...] = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")
# shortuuid's alphabet (no 0/1/I/O/l): answer ids look like the original's 22-character random ids.
EVAL_PREFIX_CACHE_BYTES = 256 << 20
"""Prefix-cache budget of ``eval vqa``'s engine (256 MiB of keys/values)."""
CHUNK_BATCHES = 4
"""Questions per engine call (and per append to the answer file), in multiples of ``batch_size``."""
_SHORTUUID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclass
class VQAQuestion:
    """One question to answer."""

    question_id: Any
    """As in the file (``id`` of converted VQA, ``question_id`` of qa50), type kept (int stays int)."""
    prompt: str
    """The question text: first human turn without the image placeholder, stripped."""
    images: list[str]
    """Image paths of the first turn (relative to the image folder unless absolute)."""

    @property
    def key(self) -> str:
        """The id as a string (how answer files are matched to questions)."""
        return str(self.question_id)

    def sample(self) -> Sample:
        """The prompt the model answers: images first, then the question (``<image>\\n`` + question)."""
        text = "<image>\n" * len(self.images) + self.prompt
        return Sample(id=self.key, messages=[Message.from_text("user", text)], images=list(self.images))


@dataclass
class VQARunResult:
    """What :func:`run_vqa` did."""

    out: str
    """The answer file (JSONL, question order)."""
    decoding: str
    """The ``decoding.json`` written beside it."""
    total: int
    """Questions in the input file."""
    answered: int
    """Questions answered by this call."""
    resumed: int
    """Questions already answered in ``out`` (kept, not re-asked)."""
    seconds: float


def read_questions(path: str | os.PathLike, format: str = "auto") -> list[VQAQuestion]:
    """The questions of a converted VQA test file or a qa50-style JSONL, in file order; ids must be unique."""
    path = Path(path)
    out: list[VQAQuestion] = []
    seen: dict[str, int] = {}
    for fmt, raw in iter_typed_records(path, format):
        where = f"{path}: record {raw.index} (line {raw.line})"
        sample = convert_record(fmt, raw.value, raw.index, where)
        rec = raw.value
        qid = next((rec[k] for k in ("question_id", "id") if k in rec and isinstance(rec[k], (int, str))), raw.index)
        user = next((m for m in sample.messages if m.role == "user"), None)
        if user is None:
            raise MedvlmError(f"{where}: no human turn holding the question")
        prompt = "".join(p["text"] for p in user.content if p.get("type") == "text").strip()
        if not prompt:
            raise MedvlmError(f"{where}: the first human turn has no question text")
        n_images = user.num_images
        if n_images == 0 and sample.images:
            n_images = len(sample.images)  # an image field without a placeholder: the image goes first, as LLaVA does
        if n_images > len(sample.images):
            raise MedvlmError(
                f"{where}: the question has {n_images} image placeholder(s) but the record names "
                f"{len(sample.images)} image(s) (field 'image')"
            )
        q = VQAQuestion(question_id=qid, prompt=prompt, images=list(sample.images[:n_images]))
        if q.key in seen:
            raise MedvlmError(f"{where}: duplicate question id {qid!r} (first in record {seen[q.key]})")
        seen[q.key] = raw.index
        out.append(q)
    if not out:
        raise MedvlmError(f"{path}: no questions")
    return out


def settings_dict(settings: Any) -> dict[str, Any]:
    """The decoding settings as a JSON-ready dict (what ``metadata`` and ``decoding.json`` hold)."""
    d = asdict(settings)
    d["stop"] = list(d.get("stop") or ())
    return d


def answer_id(model_id: str, question_id: Any, settings: dict[str, Any]) -> str:
    """A 22-character shortuuid-style id derived from (model, question, settings): reruns give the same ids."""
    blob = json.dumps([model_id, str(question_id), settings], sort_keys=True, ensure_ascii=False)
    n = int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:17], "big")
    chars = []
    for _ in range(22):
        n, r = divmod(n, len(_SHORTUUID_ALPHABET))
        chars.append(_SHORTUUID_ALPHABET[r])
    return "".join(chars)


def answer_row(q: VQAQuestion, text: str, model_id: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One line of the answer file, in the original field order."""
    return {
        "question_id": q.question_id,
        "prompt": q.prompt,
        "text": text,
        "answer_id": answer_id(model_id, q.question_id, settings),
        "model_id": model_id,
        "metadata": dict(settings),
    }


# --- the answer file: append per batch, tolerate a torn last line --------------------------------------------


def load_answers(path: str | os.PathLike, known: dict[str, VQAQuestion] | None = None) -> dict[str, dict]:
    """Complete answer rows of a (possibly interrupted) answer file, by question key; the file is not modified.

    A torn last line (a run killed mid-write) is ignored. A bad line elsewhere, an answer without
    ``question_id``/``text``, or (with ``known``) an answer to a question not in the input raises a
    MedvlmError naming the line.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows: dict[str, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            if i == last:  # torn by an interrupted write: that answer is asked again
                break
            raise MedvlmError(f"{path}:{i + 1}: not a JSON answer line ({e}); the answer file is damaged") from e
        if "question_id" not in row or not isinstance(row.get("text"), str):
            raise MedvlmError(f"{path}:{i + 1}: an answer needs 'question_id' and a string 'text'")
        key = str(row["question_id"])
        if known is not None and key not in known:
            raise MedvlmError(
                f"{path}:{i + 1}: question_id {row['question_id']!r} is not in the questions file; "
                "is --out the answer file of another test set?"
            )
        rows[key] = row
    return rows


def append_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append answer rows as one write, flushed and fsynced (a kill loses at most this batch)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_ordered(path: str | os.PathLike, questions: list[VQAQuestion], rows: dict[str, dict]) -> int:
    """Rewrite the answer file atomically with the answered questions in question order; returns the count."""
    ordered = [rows[q.key] for q in questions if q.key in rows]
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    return len(ordered)


# --- answering -----------------------------------------------------------------------------------------------


def answer_into(
    engine: Any,
    questions: list[VQAQuestion],
    out: str | os.PathLike,
    settings: Any,
    model_id: str,
    batch_size: int,
    image_folder: str | os.PathLike | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Answer ``questions`` with an :class:`~medvlm.infer.engine.InferenceEngine`, appending each chunk to ``out``.

    Questions about the same image(s) are answered together (first-appearance order of each image), so the
    engine prefills each image prefix once and reuses it for all its questions; a chunk is
    ``CHUNK_BATCHES * batch_size`` questions, decoded continuously ``batch_size`` rows at a time. The file
    is rewritten in question order at the end of the run.
    """
    sdict = settings_dict(settings)
    groups: dict[tuple[str, ...], list[VQAQuestion]] = {}
    for q in questions:
        groups.setdefault(tuple(q.images), []).append(q)
    ordered = [q for g in groups.values() for q in g]
    step = CHUNK_BATCHES * batch_size
    done = 0
    for start in range(0, len(ordered), step):
        chunk = ordered[start : start + step]
        texts = engine.generate([q.sample() for q in chunk], settings, image_folder=image_folder)
        append_rows(out, [answer_row(q, t, model_id, sdict) for q, t in zip(chunk, texts)])
        done += len(chunk)
        if on_batch is not None:
            on_batch(len(chunk))
    return done


def load_engine(model: str | os.PathLike, batch_size: int, self_question: int = 0) -> Any:
    """Load a saved medvlm model and wrap it in an inference engine
    (``self_question`` > 0: test-time self-questioning)."""
    from medvlm.infer.engine import InferenceEngine
    from medvlm.infer.loading import load_for_inference

    m, processor = load_for_inference(model)
    # Questions arrive grouped by image, so an image prefix is rarely needed after its group: a small budget.
    engine = InferenceEngine(m, processor, batch_size=batch_size, prefix_cache_bytes=EVAL_PREFIX_CACHE_BYTES)
    if self_question:
        from medvlm.infer.self_question import SelfQuestioningAnswerer

        return SelfQuestioningAnswerer(engine, self_question)
    return engine


def split_contiguous(items: list, k: int) -> list[list]:
    """``k`` contiguous chunks of near-equal size (sizes differ by at most one), empty ones dropped."""
    n = len(items)
    bounds = [n * i // k for i in range(k + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(k) if bounds[i + 1] > bounds[i]]


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _part_path(out: Path, i: int) -> Path:
    return out.with_name(f"{out.name}.part{i}")


def _check_decoding(path: Path, record: dict[str, Any], out: Path, have_answers: bool) -> None:
    """A resumed file must have been written with the same model id and settings (else answers would mix)."""
    if not have_answers or not path.is_file():
        return
    old = read_json(path)
    defaults = {"self_question": 0}  # decoding.json files written before the option existed
    for key in ("model_id", "settings", "self_question"):
        if isinstance(old, dict) and old.get(key, defaults.get(key)) != record[key]:
            raise MedvlmError(
                f"{out} holds answers written with another {key} ({old.get(key)!r}, now {record[key]!r}; see {path}); "
                "use a new --out or delete the old answers"
            )


def run_vqa(
    model: str | os.PathLike,
    questions: str | os.PathLike,
    out: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    settings: Any = None,
    batch_size: int = 16,
    processes: int = 1,
    model_id: str | None = None,
    format: str = "auto",
    progress: bool = True,
    self_question: int = 0,
) -> VQARunResult:
    """Answer every question of ``questions`` with the model in folder ``model`` into ``out`` (see the module doc)."""
    from medvlm.infer.engine import GenerationSettings

    started = time.time()
    settings = (settings or GenerationSettings()).validate()
    if batch_size < 1:
        raise MedvlmError(f"batch_size must be >= 1 (got {batch_size})")
    if processes < 1:
        raise MedvlmError(f"processes must be >= 1 (got {processes})")
    model_dir, out = Path(model), Path(out)
    if not model_dir.is_dir():
        raise MedvlmError(f"--model {model_dir}: not a model folder")
    if out.is_dir():
        raise MedvlmError(f"--out {out}: is a directory; give the answer file's path (e.g. {out / 'answers.jsonl'})")
    qs = read_questions(questions, format)
    by_key = {q.key: q for q in qs}
    mid = model_id or model_dir.resolve().name
    sdict = settings_dict(settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = load_answers(out, by_key)
    for part in sorted(out.parent.glob(f"{out.name}.part*")):  # chunks of an interrupted multi-process run
        done.update(load_answers(part, by_key))
    decoding_path = out.parent / DECODING_FILE
    record = {
        "model": str(model_dir.resolve()),
        "model_id": mid,
        "settings": sdict,
        "questions": str(Path(questions).resolve()),
        "image_folder": None if image_folder is None else str(Path(image_folder).resolve()),
        "answers": out.name,
        "n_questions": len(qs),
        "batch_size": batch_size,
        "processes": processes,
        "greedy": settings.temperature == 0,
        "self_question": self_question,
    }
    _check_decoding(decoding_path, record, out, bool(done))
    write_json_atomic(decoding_path, record)
    resumed = len(done)
    write_ordered(out, qs, done)  # drops torn lines, folds leftover chunk files in, before anything is appended
    for part in out.parent.glob(f"{out.name}.part*"):
        part.unlink()
    pending = [q for q in qs if q.key not in done]
    if pending and processes == 1:
        bar = progress_bar(len(pending), progress)
        engine = load_engine(model_dir, batch_size, self_question)
        answer_into(engine, pending, out, settings, mid, batch_size, image_folder, on_batch=bar.update)
        bar.close()
    elif pending:
        _run_chunks(
            model_dir,
            Path(questions),
            format,
            out,
            image_folder,
            settings,
            batch_size,
            mid,
            split_contiguous(pending, processes),
            progress,
            self_question,
        )
    final = load_answers(out, by_key)
    for part in out.parent.glob(f"{out.name}.part*"):
        final.update(load_answers(part, by_key))
    write_ordered(out, qs, final)
    for part in out.parent.glob(f"{out.name}.part*"):
        part.unlink()
    missing = [q.key for q in qs if q.key not in final]
    if missing:
        raise MedvlmError(
            f"{len(missing)} question(s) left unanswered (e.g. {', '.join(missing[:5])}); rerun to resume"
        )
    return VQARunResult(
        out=str(out),
        decoding=str(decoding_path),
        total=len(qs),
        answered=len(qs) - resumed,
        resumed=resumed,
        seconds=time.time() - started,
    )


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr counting answered questions (shown only when ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="answering", unit="q", disable=not enabled, file=sys.stderr)


@dataclass
class ChunkJob:
    """One subprocess's share of a multi-process run (serialised to JSON for :mod:`medvlm.eval.tasks`)."""

    model: str
    questions: str
    format: str
    keys: list[str]
    """Question keys of this chunk, in question order."""
    out: str
    """The chunk's own answer file (``OUT.partI``)."""
    image_folder: str | None
    settings: dict[str, Any]
    batch_size: int
    model_id: str
    threads: int
    """torch intra-op threads of the subprocess (cores / K)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _run_chunks(
    model_dir: Path,
    questions: Path,
    format: str,
    out: Path,
    image_folder,
    settings: Any,
    batch_size: int,
    model_id: str,
    chunks: list[list[VQAQuestion]],
    progress: bool,
    self_question: int = 0,
) -> None:
    threads = max(1, cores() // len(chunks))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = []
    with tempfile.TemporaryDirectory(prefix="medvlm_vqa_") as tmp:
        for i, chunk in enumerate(chunks):
            job = ChunkJob(
                model=str(model_dir),
                questions=str(questions),
                format=format,
                keys=[q.key for q in chunk],
                out=str(_part_path(out, i)),
                image_folder=None if image_folder is None else str(image_folder),
                settings=settings_dict(settings),
                batch_size=batch_size,
                model_id=model_id,
                threads=threads,
                extra={"self_question": self_question},
            )
            job_path = Path(tmp) / f"job{i}.json"
            job_path.write_text(json.dumps(asdict(job)), encoding="utf-8")
            # Only the first chunk shows a progress bar, so K bars do not fight over one terminal.
            args = [sys.executable, "-m", "medvlm.eval.tasks", str(job_path)] + (
                ["--progress"] if progress and i == 0 else []
            )
            procs.append(subprocess.Popen(args, env=env))
        try:
            failed = [(i, p.wait()) for i, p in enumerate(procs)]
        finally:  # interrupted (Ctrl-C): stop the chunks; what they appended is kept for the resume
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait()
    bad = [(i, rc) for i, rc in failed if rc != 0]
    if bad:
        raise MedvlmError(
            "answering chunk(s) failed: "
            + ", ".join(f"chunk {i} exit code {rc}" for i, rc in bad)
            + " (their errors are printed above); rerun the same command to resume"
        )
