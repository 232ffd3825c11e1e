"""Instruction generation: figure captions -> LLM conversations, one JSONL line per completed figure.

Figures are taken round-robin across the domain lists of the fig-captions file (so a cut with
``max_samples`` keeps the domains balanced), de-duplicated by ``pair_id`` and cut to exactly
``max_samples``. Each completed request is appended (and fsync'ed) at once, so an interrupted run
loses nothing; a rerun skips figures already in the output and, through the response cache, pays
for nothing twice. A failed request is reported (and listed in ``{out}.errors.jsonl``) and leaves
the rest of the run untouched; rerunning retries exactly the failed ones.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from medvlm.data.instruct.prompts import PromptSet, build_messages, load_prompts
from medvlm.data.readers.figures import FigureRecord, read_fig_captions
from medvlm.errors import MedvlmError
from medvlm.llm import LLMClient, LLMConfig, LLMRequest, LLMResult
from medvlm.utils.io import append_jsonl, iter_jsonl, write_jsonl_atomic


@dataclass
class GenerateConfig:
    """Inputs and outputs of instruction generation."""

    captions: Path
    """``llava_med_instruct_fig_captions.json`` (a JSON object of lists, one per domain)."""
    out: Path
    """Output JSONL: each input record + ``result`` (raw model text) + ``generation`` metadata; appended to."""
    inline_mentions: bool = False
    """Also show the sentences of the paper that mention the figure (``Figure Context:``)."""
    max_samples: int | None = None
    """Exactly this many figures (fewer only if the file has fewer); None = all."""
    few_shot: Path | None = None
    """Few-shot file (format of ``medvlm/resources/instruct_few_shot.json``); None = the packaged one."""

    def errors_path(self) -> Path:
        """Where the failed figures of the last run are listed."""
        return self.out.with_name(self.out.name + ".errors.jsonl")

    def default_cache_path(self) -> Path:
        """The response cache used when the LLM config names none: beside the output."""
        return self.out.with_name(self.out.name + ".llm_cache.sqlite")


@dataclass
class GenerateReport:
    """What a generation run did."""

    selected: int = 0
    """Figures selected from the input (after de-duplication and ``max_samples``)."""
    already_done: int = 0
    """Selected figures found in the output from an earlier run (not requested again)."""
    generated: int = 0
    """Figures completed and appended in this run (fresh or from the cache)."""
    from_cache: int = 0
    failed: list[dict] = field(default_factory=list)
    """``{"pair_id", "error", "attempts"}`` per figure that ended without a reply."""
    duplicates: int = 0
    """Input records skipped because their ``pair_id`` appeared earlier."""
    dropped_lines: list[str] = field(default_factory=list)
    """Unreadable lines found in an existing output (a torn last line is cut off and regenerated)."""
    usage: str = ""
    """Token / cost summary."""


def select_records(
    groups: dict[str, list[FigureRecord]], max_samples: int | None = None
) -> tuple[list[FigureRecord], int]:
    """Round-robin across the domain lists, de-duplicated by ``pair_id``; ``(records, duplicates)``."""
    if max_samples is not None and max_samples < 0:
        raise MedvlmError(f"max_samples must be >= 0, got {max_samples}")
    seen: set[str] = set()
    out: list[FigureRecord] = []
    dups = 0
    lists = [list(v) for v in groups.values()]
    for i in range(max((len(v) for v in lists), default=0)):
        for lst in lists:
            if i >= len(lst):
                continue
            rec = lst[i]
            if rec.pair_id in seen:
                dups += 1
                continue
            seen.add(rec.pair_id)
            out.append(rec)
    return (out[:max_samples] if max_samples is not None else out), dups


def _cut_torn_tail(path: Path) -> bool:
    """Truncate a last line without its newline (a write cut short); True if something was cut."""
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read_done(cfg: GenerateConfig, model: str, fingerprint: str, report: GenerateReport) -> set[str]:
    """pair_ids already in the output; refuses an output made with another model, prompt or mention setting."""
    done: set[str] = set()
    if not cfg.out.exists():
        return done
    if _cut_torn_tail(cfg.out):
        report.dropped_lines.append(f"{cfg.out}: cut off an incomplete last line (it will be regenerated)")
    for lineno, row in iter_jsonl(cfg.out, skip_bad=True, bad=report.dropped_lines):
        gen = row.get("generation") if isinstance(row, dict) else None
        if not isinstance(gen, dict) or not isinstance(row.get("pair_id"), str):
            report.dropped_lines.append(f"{cfg.out}:{lineno}: not a generation record (no pair_id/generation)")
            continue
        mine = {"model": model, "prompt": fingerprint, "inline_mentions": cfg.inline_mentions}
        theirs = {k: gen.get(k) for k in mine}
        if theirs != mine:
            diff = ", ".join(f"{k}={theirs[k]!r} (now {mine[k]!r})" for k in mine if theirs[k] != mine[k])
            raise MedvlmError(
                f"{cfg.out}:{lineno}: this output was generated with {diff} ('prompt' is a hash of "
                "the system text and few-shot file); write to a new --out or keep the earlier settings"
            )
        done.add(row["pair_id"])
    return done


def _output_row(rec: FigureRecord, res: LLMResult, model: str, fingerprint: str, inline: bool) -> dict:
    row = dict(rec.raw)
    row.setdefault("domain_list", rec.domain_list)
    row["result"] = res.text
    row["generation"] = {
        "model": model,
        "served_model": (res.response or {}).get("model"),
        "prompt": fingerprint,
        "inline_mentions": inline,
        "usage": res.usage,
        "finish_reason": res.finish_reason,
        "cached": res.cached,
        "request_key": res.key,
    }
    return row


def generate_instructions(cfg: GenerateConfig, llm: LLMConfig, *, prompts: PromptSet | None = None) -> GenerateReport:
    """Generate conversations for the selected figures; see the module docstring. Returns a report."""
    if cfg.captions.resolve() == cfg.out.resolve():
        raise MedvlmError(f"--out {cfg.out} is the captions file itself")
    prompts = prompts or load_prompts(cfg.few_shot)
    fingerprint = prompts.fingerprint()
    records, dups = select_records(read_fig_captions(cfg.captions), cfg.max_samples)
    report = GenerateReport(selected=len(records), duplicates=dups)
    done = _read_done(cfg, llm.model, fingerprint, report)
    todo = [r for r in records if r.pair_id not in done]
    report.already_done = len(records) - len(todo)
    if llm.cache_path is None:
        llm = dataclasses.replace(llm, cache_path=cfg.default_cache_path())
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    by_tag = {r.pair_id: r for r in todo}

    def on_result(res: LLMResult) -> None:
        rec = by_tag[res.tag]
        if res.ok:
            append_jsonl(cfg.out, _output_row(rec, res, llm.model, fingerprint, cfg.inline_mentions))
            report.generated += 1
            report.from_cache += int(res.cached)
        else:
            report.failed.append(
                {"pair_id": rec.pair_id, "domain_list": rec.domain_list, "error": res.error, "attempts": res.attempts}
            )

    with LLMClient(llm) as client:
        try:
            client.complete_many(
                (LLMRequest(build_messages(r, prompts, cfg.inline_mentions), tag=r.pair_id) for r in todo),
                on_result=on_result,
                desc="instruct generate",
                keep_results=False,
                total=len(todo),
            )
        finally:
            report.usage = client.usage.summary(llm)
            errors = cfg.errors_path()
            if report.failed:
                write_jsonl_atomic(errors, report.failed)
            elif errors.exists():
                errors.unlink()  # every figure of an earlier failed run has now been generated
    return report
