"""One CLI vocabulary: old spellings still work (with one deprecation line), the new ones are used everywhere,
and README's pipeline table lists exactly the verbs ``medvlm --help`` lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from medvlm.cli import app
from medvlm.utils.cli import RenamedCommand

ROOT = Path(__file__).resolve().parents[1]

# Every old spelling kept for one release: (command path, old spelling). Positional ones are named by parameter.
EXPECTED_RENAMES = {
    ("demo", "--json-out"),
    ("data stats", "--json"),
    ("data convert", "--src"),
    ("data group", "src"),
    ("instruct generate", "--model"),
    ("instruct postprocess", "--report"),
    ("model export", "dst"),
    ("model import", "dst"),
    ("model apply-delta", "--target"),
    ("model make-delta", "--delta"),
    ("train", "--output_dir"),
    ("train", "--output-dir"),
    ("prefs generate", "--images"),
    ("eval chat", "--model"),
    ("eval vqa", "--model-id"),
    ("eval bench", "--model-id"),
    ("serve worker", "--model-name"),
    ("serve test-message", "--model"),
}

# Spellings no verb may declare any more (each is an alias somewhere, or was a dialect).
RETIRED = {
    "--json-out",
    "--json",
    "--report",
    "--model-name",
    "--model-id",
    "--output_dir",
    "--output-dir",
    "--images",
    "--src",
}


def _commands(group=None, path: str = ""):
    """(path, click command) of every verb, recursively, as `--help` lists them (hidden ones skipped)."""
    group = group or typer.main.get_command(app)
    ctx = typer.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        full = f"{path} {name}".strip()
        if hasattr(cmd, "list_commands"):
            yield from _commands(cmd, full)
        else:
            yield full, cmd


COMMANDS = dict(_commands())


def _renames():
    for path, cmd in COMMANDS.items():
        if isinstance(cmd, RenamedCommand):
            for old, new in cmd.renamed_options.items():
                yield path, cmd, old, new, False
            for name, new in cmd.renamed_positional.items():
                yield path, cmd, name, new, True


def _option(cmd, flag):
    return next(p for p in cmd.params if flag in getattr(p, "opts", ()))


def _parse(cmd, path, args):
    return cmd.make_context(f"medvlm {path}", list(args), resilient_parsing=True).params


def test_the_rename_table_is_complete():
    assert {(path, old) for path, _, old, _, _ in _renames()} == EXPECTED_RENAMES


@pytest.mark.parametrize(
    ("path", "cmd", "old", "new", "positional"), list(_renames()), ids=[f"{p} {o}" for p, _, o, _, _ in _renames()]
)
def test_old_spelling_still_works_and_prints_one_deprecation_line(path, cmd, old, new, positional, capsys):
    flag, *fixed = new.split()
    option = _option(cmd, flag)
    value = [] if fixed else ["/tmp/x-value"]
    if positional:
        before = [p for p in cmd.params if p.param_type_name == "argument" and not p.hidden]
        old_args = ["first"] * len(before) + value  # the deprecated positional comes after the visible ones
        new_args = ["first"] * len(before) + [flag, *value]
    else:
        old_args, new_args = [old, *value], [flag, *fixed, *value]
        # not a declared option: only the alias makes it work
        declared = {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
        assert old not in declared
    got = _parse(cmd, path, old_args)
    err = capsys.readouterr().err
    want = _parse(cmd, path, new_args)
    assert capsys.readouterr().err == ""  # the new spelling is silent
    assert got[option.name] == want[option.name] is not None
    lines = [line for line in err.splitlines() if "deprecated" in line]
    assert len(lines) == 1 and f"medvlm {path}" in lines[0] and f"use {new}" in lines[0], err


def test_no_verb_declares_a_retired_spelling_and_model_is_always_a_checkpoint():
    for path, cmd in COMMANDS.items():
        for p in cmd.params:
            opts = set(getattr(p, "opts", ())) | set(getattr(p, "secondary_opts", ()))
            assert not opts & RETIRED, (path, opts & RETIRED)
            if "--model" in opts:
                # a checkpoint folder (or hub id), never an LLM name or a served name
                assert p.type_descriptor.annotation is Path, (path, p.type_descriptor.annotation)
    llm_names = {
        path: [o for p in cmd.params for o in getattr(p, "opts", ()) if o in ("--llm-model", "--judge-model")]
        for path, cmd in COMMANDS.items()
    }
    assert {p: v for p, v in llm_names.items() if v} == {
        "instruct generate": ["--llm-model"],
        "eval chat": ["--judge-model"],
        "prefs generate": ["--judge-model"],
    }
    served = {
        path for path, cmd in COMMANDS.items() for p in cmd.params if "--served-model-name" in getattr(p, "opts", ())
    }
    assert served == {"serve api", "serve worker", "serve test-message", "eval vqa", "eval bench"}


def test_prefs_generate_has_the_shared_llm_options():
    opts = {o for p in COMMANDS["prefs generate"].params for o in getattr(p, "opts", ())}
    shared = {
        o
        for p in COMMANDS["instruct generate"].params
        for o in getattr(p, "opts", ())
        if getattr(p, "rich_help_panel", None) == "LLM endpoint"
    }
    assert "--azure-endpoint" in shared and "--llm-model" in shared
    assert shared - {"--llm-model"} | {"--judge-model"} <= opts


def _readme_verbs() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## The pipeline, command by command", 1)[1].split("\n\n", 2)[1]
    groups = {path.split()[0] for path in COMMANDS if " " in path}
    verbs = set()
    for first, second in re.findall(r"`medvlm ([a-z][a-z-]*)(?: ([a-z][a-z-]*)\b)?", table):
        if first in groups:
            assert second, f"README names the group `medvlm {first}` without a verb"
            verbs.add(f"{first} {second}")
        else:
            verbs.add(first)
    return verbs


def test_readme_table_lists_every_verb_of_medvlm_help():
    assert _readme_verbs() == set(COMMANDS)
    # and each verb is what `--help` of its group prints
    runner = CliRunner()
    helps: dict[tuple[str, ...], str] = {}
    for path in COMMANDS:
        *group, verb = path.split()
        if tuple(group) not in helps:
            res = runner.invoke(app, [*group, "--help"], terminal_width=200)
            assert res.exit_code == 0, res.output
            helps[tuple(group)] = res.output
        assert re.search(rf"\b{re.escape(verb)}\b", helps[tuple(group)]), path


def test_old_spellings_end_to_end(tmp_path):
    runner = CliRunner()
    data = tmp_path / "d.json"
    data.write_text(
        json.dumps(
            [
                {
                    "id": f"q{i}",
                    "image": "a.png",
                    "conversations": [
                        {"from": "human", "value": f"<image>\nquestion {i}?"},
                        {"from": "gpt", "value": "yes"},
                    ],
                }
                for i in range(2)
            ]
        )
    )
    old = runner.invoke(app, ["data", "stats", str(data), "--json"])
    new = runner.invoke(app, ["data", "stats", str(data), "--out", "-"])
    assert old.exit_code == new.exit_code == 0
    assert json.loads(old.stdout) == json.loads(new.stdout) and json.loads(new.stdout)["records"] == 2
    assert "use --out -" in old.stderr and "deprecated" not in new.stderr
    res = runner.invoke(app, ["data", "stats", str(data), "--out", str(tmp_path / "s.json")])
    assert res.exit_code == 0 and json.loads((tmp_path / "s.json").read_text()) == json.loads(new.stdout)

    res = runner.invoke(app, ["data", "group", str(data), "--out", str(tmp_path / "g_old.json")])
    assert res.exit_code == 0, res.output
    assert "use --in SRC" in res.stderr
    res = runner.invoke(app, ["data", "group", "--in", str(data), "--out", str(tmp_path / "g_new.json")])
    assert res.exit_code == 0 and "deprecated" not in res.stderr
    assert (tmp_path / "g_old.json").read_text() == (tmp_path / "g_new.json").read_text()
    both = runner.invoke(app, ["data", "group", str(data), "--in", str(data), "--out", str(tmp_path / "g.json")])
    assert both.exit_code == 2 and "give --in only" in both.output
    missing = runner.invoke(app, ["model", "export", str(tmp_path), "--to", "llava-hf"])
    assert missing.exit_code == 2 and "--out" in missing.output
