"""The synthetic demo dataset: deterministic, pixel-decided answers, held-out split, LLaVA-Med formats."""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlm.data.readers.figures import DOMAINS, read_fig_captions
from medvlm.data.synth import blind_baseline, generate_synth
from medvlm.errors import MedvlmError
from medvlm.notice import NOTICE

SIZE = 64
N = 120


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_synth(out, n_images=N, seed=3, image_size=SIZE)
    return out


def _load(p: Path):
    return json.loads(p.read_text(encoding="utf-8"))


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- reading the factors back from the pixels ---------------------------------------------------


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pix = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pix.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(np.array(pix))
    return comps


def _modality_from_pixels(a: np.ndarray) -> str:
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    if ((r > 200) & (g < r - 30)).mean() > 0.4:
        return "histology"
    if (b > r + 40).mean() > 0.15:
        return "gross"
    corner = a[:3, :3].mean()
    if corner < 5:
        return "ct"
    if corner < 26:
        return "mri"
    return "xray"


def read_factors(path: Path) -> dict:
    """Modality, count, side, size and intensity recovered from an image with simple numpy rules."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    s = a.shape[0]
    bright = _components(a.min(-1) >= 230)
    dark = [
        c
        for c in _components(a.max(-1) <= 40)  # background outside the body touches the border
        if not (c.min() == 0 or c[:, 0].max() == s - 1 or c[:, 1].max() == s - 1)
    ]
    assert not (bright and dark), f"{path.name}: both bright and dark lesions"
    comps = bright or dark
    sides = set()
    for c in comps:
        xs = c[:, 1]
        assert xs.max() < s / 2 or xs.min() >= s / 2, f"{path.name}: a lesion crosses the midline"
        sides.add("left" if xs.max() < s / 2 else "right")
    areas = [len(c) for c in comps]
    size = "large" if np.mean(areas) > np.pi * (0.065 * s) ** 2 else "small"
    assert all((a_ > np.pi * (0.065 * s) ** 2) == (size == "large") for a_ in areas), f"{path.name}: mixed sizes"
    return {
        "modality": _modality_from_pixels(a),
        "count": len(comps),
        "side": "both" if len(sides) == 2 else sides.pop(),
        "size": size,
        "intensity": "bright" if bright else "dark",
    }


_CAPTION_MOD = {
    r"\bx-ray\b": "xray",
    r"\bct\b": "ct",
    r"\bmri\b": "mri",
    r"\bhisto": "histology",
    r"\bgross\b": "gross",
}
_WORD = {"one": 1, "two": 2, "three": 3}


def parse_caption(cap: str) -> dict:
    m = re.search(r"(one|two|three) (small|large) (bright|dark) lesions? on (?:the )?(left|right|both)", cap)
    assert m, cap
    mods = [v for k, v in _CAPTION_MOD.items() if re.search(k, cap.lower())]
    assert len(mods) == 1, cap
    mod = mods[0]
    return {
        "modality": mod,
        "count": _WORD[m.group(1)],
        "size": m.group(2),
        "intensity": m.group(3),
        "side": m.group(4),
    }


def closed_answer(q: str, f: dict) -> str:
    """The yes/no answer a closed VQA question must have on factors ``f`` (read from the question text)."""
    q = q.lower()
    nouns = {
        "chest x-ray": "xray",
        "ct scan": "ct",
        "mri scan": "mri",
        "histology slide": "histology",
        "gross pathology": "gross",
    }
    for noun, mod in nouns.items():
        if noun in q:
            return "yes" if f["modality"] == mod else "no"
    if "both sides" in q:
        return "yes" if f["side"] == "both" else "no"
    m = re.search(r"only (?:on )?the (left|right)", q)
    if m:
        return "yes" if f["side"] == m.group(1) else "no"
    m = re.search(r"the (left|right) (?:side|half)", q)
    if m:
        return "yes" if f["side"] in (m.group(1), "both") else "no"
    m = re.search(r"\b(one|single|two|three)\b", q)
    if m:
        return "yes" if f["count"] == _WORD.get(m.group(1), 1) else "no"
    for word, key in (("small", "size"), ("large", "size"), ("bright", "intensity"), ("dark", "intensity")):
        if word in q:
            return "yes" if f[key] == word else "no"
    raise AssertionError(f"unparsed closed question {q!r}")


def test_every_factor_is_decided_by_the_pixels_and_every_answer_follows(ds):
    labels = {r["image"]: parse_caption(r["conversations"][1]["value"]) for r in _load(ds / "alignment.json")}
    labels.update({r["image"]: parse_caption(r["fig_caption"]) for r in _jsonl(ds / "qa50.jsonl")})
    images = sorted(p.name for p in (ds / "images").glob("*.png"))
    assert len(images) == N and set(labels) == set(images)
    pixels = {name: read_factors(ds / "images" / name) for name in images}
    for name in images:
        assert pixels[name] == labels[name], name
    for r in _jsonl(ds / "factors.jsonl"):
        assert pixels[r.pop("image")] == {k: v for k, v in r.items() if k != "split"}
    open_answer = {
        "MODALITY": lambda f: {"xray": "x-ray"}.get(f["modality"], f["modality"]),
        "COUNT": lambda f: {1: "one", 2: "two", 3: "three"}[f["count"]],
        "POS": lambda f: f["side"],
        "SIZE": lambda f: f["size"],
    }
    for split in ("train", "test"):
        for r in _load(ds / "vqa" / f"{split}.json"):
            f = pixels[r["image"]]
            q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
            expected = closed_answer(q, f) if r["answer_type"] == "CLOSED" else open_answer[r["question_type"]](f)
            assert a == expected, (r, f)


def test_same_seed_gives_byte_identical_files_and_images_do_not_depend_on_n(tmp_path):
    generate_synth(tmp_path / "a", n_images=24, seed=11, image_size=48)
    generate_synth(tmp_path / "b", n_images=24, seed=11, image_size=48)
    generate_synth(tmp_path / "c", n_images=24, seed=12, image_size=48)
    generate_synth(tmp_path / "d", n_images=30, seed=11, image_size=48)
    a, b, c, d = (_digests(tmp_path / x) for x in "abcd")
    assert a == b and len(a) == 24 + 10
    assert a != c and a["images/synth00000_F1.png"] != c["images/synth00000_F1.png"]
    assert all(d[k] == v for k, v in a.items() if k.startswith("images/"))


def test_held_out_images_never_appear_in_training_files(ds):
    m = _load(ds / "manifest.json")
    test_imgs = {r["image"] for r in _load(ds / "vqa" / "test.json")}
    train_sets = [
        {r["image"] for r in _load(ds / "vqa" / "train.json")},
        {r["image"] for r in _load(ds / "alignment.json")},
        {r["image"] for r in _load(ds / "instruct.json")},
        {f"{r.pair_id}.png" for recs in read_fig_captions(ds / "fig_captions.json").values() for r in recs},
    ]
    assert len(test_imgs) == m["n_test_images"] == round(N * 0.2)
    for s in train_sets:
        assert s and not (s & test_imgs)
        assert len(s) == m["n_train_images"]
    assert {r["image"] for r in _jsonl(ds / "qa50.jsonl")} <= test_imgs
    assert train_sets[0] | test_imgs == {p.name for p in (ds / "images").glob("*.png")}


def test_files_follow_the_llava_med_formats(ds):
    m = _load(ds / "manifest.json")
    candidates = set(_load(ds / "vqa" / "train_open_answers.json")["0"])
    for split in ("train", "test"):
        rows = _load(ds / "vqa" / f"{split}.json")
        assert len(rows) == m["files"][f"vqa/{split}.json"] == 4 * m[f"n_{split}_images"]
        for r in rows:
            assert set(r) == {"id", "image", "answer_type", "question_type", "conversations"}
            (h, g) = r["conversations"]
            assert h["from"] == "human" and h["value"].startswith("<image>\n") and g["from"] == "gpt"
            assert g["value"] == g["value"].lower() and len(g["value"].split()) == 1
            if r["answer_type"] == "CLOSED":
                assert g["value"] in ("yes", "no")
            elif split == "train":
                assert g["value"] in candidates
        assert len({r["id"] for r in rows}) == len(rows)
    with Image.open(ds / "images" / rows[0]["image"]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"

    for r in _load(ds / "alignment.json"):
        assert "conversatons" not in r and r["id"] == r["image"][:-4]
        (h, g) = r["conversations"]
        assert h["value"].count("<image>") == 1 and (
            h["value"].startswith("<image>\n") or h["value"].endswith("\n<image>")
        )
    for r in _load(ds / "instruct.json"):
        turns = r["conversations"]
        assert 4 <= len(turns) <= 8 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].count("<image>") == 1 and all("<image>" not in t["value"] for t in turns[1:])
        assert set(r["domain"]) == set(DOMAINS) and sum(r["domain"].values()) == 1

    qa = _jsonl(ds / "qa50.jsonl")
    keys = {
        "question_id",
        "image",
        "pair_id",
        "text",
        "gpt4_answer",
        "fig_caption",
        "fig_label",
        "in_text_mention",
        "domain",
        "type",
    }
    assert len(qa) == 4 * min(50, m["n_test_images"]) == m["files"]["qa50.jsonl"]
    assert [r["question_id"] for r in qa] == list(range(len(qa)))
    for r in qa:
        assert set(r) == keys and r["text"].endswith("\n<image>") and r["image"] == f"{r['pair_id']}.png"
        assert r["type"] in ("conversation", "detailed_description") and r["gpt4_answer"]
    assert sum(r["type"] == "detailed_description" for r in qa) == len(qa) // 4


def test_fig_captions_read_with_the_reader(ds):
    figs = read_fig_captions(ds / "fig_captions.json")
    assert list(figs) == list(DOMAINS)
    recs = [r for v in figs.values() for r in v]
    assert len(recs) == _load(ds / "manifest.json")["n_train_images"]
    for dom, items in figs.items():
        for r in items:
            assert r.domain[dom] and sum(r.domain.values()) == 1
            assert r.fig_label == "Figure 1" and r.mentions and "Figure 1" in r.mentions[0]
            assert parse_caption(r.fig_caption)


def test_manifest_and_readme(ds):
    m = _load(ds / "manifest.json")
    assert m["generator"] == "medvlm-synth" and m["seed"] == 3 and m["image_size"] == SIZE
    assert m["files"]["images"] == N == m["n_train_images"] + m["n_test_images"]
    for split in ("train", "test"):
        for counts in m["factor_distribution"][split].values():
            assert sum(counts.values()) == m[f"n_{split}_images"]
    assert m["blind_baseline"] == blind_baseline(ds / "vqa" / "train.json", ds / "vqa" / "test.json")
    readme = (ds / "README.md").read_text(encoding="utf-8")
    assert NOTICE in readme and f"{m['blind_baseline']['closed']:.3f}" in readme


def test_blind_baseline_is_low(tmp_path):
    m = generate_synth(tmp_path / "big", n_images=800, seed=0, image_size=SIZE)
    b = m.blind_baseline
    assert 0.40 <= b["closed"] <= 0.60 and b["n_closed"] == 320
    assert b["open_recall"] <= 0.37 and b["n_open"] == 320
    assert b["by_question"]["closed"] <= 0.60 and b["by_question"]["open_recall"] <= 0.40
    dist = m.factor_distribution["train"]
    for factor, counts in dist.items():  # every value of every factor is well represented
        assert min(counts.values()) >= 0.6 * sum(counts.values()) / len(counts), (factor, counts)


def test_the_default_size_writes_every_image_at_that_size(tmp_path):
    m = generate_synth(tmp_path / "s", n_images=200, seed=1, image_size=128)
    images = sorted((tmp_path / "s" / "images").iterdir())
    assert len(images) == m.files["images"] == 200
    for p in images[::20]:
        with Image.open(p) as im:
            assert im.size == (128, 128) and im.mode == "RGB"


def test_blind_baseline_scores_majorities_with_llava_med_rules(tmp_path):
    def rec(i, atype, kind, q, a):
        return {
            "id": i,
            "image": "x.png",
            "answer_type": atype,
            "question_type": kind,
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
        }

    train = [
        rec(0, "CLOSED", "PRES", "Is it?", "yes"),
        rec(1, "CLOSED", "PRES", "Is it?", "yes"),
        rec(2, "CLOSED", "PRES", "Is it not?", "no"),
        rec(3, "OPEN", "ABN", "What?", "free air"),
        rec(4, "OPEN", "ABN", "What?", "free air"),
        rec(5, "OPEN", "ABN", "Which?", "mass"),
    ]
    test = [
        rec(6, "CLOSED", "PRES", "Is it?", "yes"),
        rec(7, "CLOSED", "PRES", "Is it not?", "no"),
        rec(8, "OPEN", "ABN", "Which?", "air mass"),
        rec(9, "OPEN", "ABN", "What?", "Free air"),
    ]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    b = blind_baseline(tmp_path / "train.json", tmp_path / "test.json")
    assert b["by_kind"]["CLOSED/PRES"]["majority"] == "yes" and b["closed"] == 0.5
    assert b["by_kind"]["OPEN/ABN"]["majority"] == "free air" and b["open_recall"] == pytest.approx(0.75)
    assert b["by_question"] == {"closed": 1.0, "open_recall": pytest.approx(0.75)}

    (tmp_path / "bad.json").write_text(json.dumps([test[0], {"id": 1, "answer_type": "OPEN"}]))
    with pytest.raises(MedvlmError, match=r"bad.json: record 1: field 'conversations'"):
        blind_baseline(tmp_path / "train.json", tmp_path / "bad.json")


def test_bad_arguments_and_foreign_folders_are_refused(tmp_path):
    with pytest.raises(MedvlmError, match="n_images"):
        generate_synth(tmp_path / "x", n_images=5)
    with pytest.raises(MedvlmError, match="image_size"):
        generate_synth(tmp_path / "x", n_images=20, image_size=16)
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(MedvlmError, match="not empty"):
        generate_synth(foreign, n_images=20, image_size=48)
    with pytest.raises(MedvlmError, match="refusing"):
        generate_synth(foreign, n_images=20, image_size=48, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    generate_synth(tmp_path / "ds", n_images=20, image_size=48)
    m = generate_synth(tmp_path / "ds", n_images=30, image_size=48, overwrite=True)
    assert len(list((tmp_path / "ds" / "images").glob("*.png"))) == 30 == m.n_images
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_cli_generates_and_prints_the_blind_baseline(tmp_path, capsys):
    from medvlm.cli import main

    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--out", str(out), "--n-images", "30", "--image-size", "48", "--seed", "4"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "Blind baseline" in printed and "CLOSED (accuracy)" in printed and "30 images" in printed
    assert _load(out / "manifest.json")["seed"] == 4
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--out", str(out), "--n-images", "30"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_train_extra_closed_adds_pixel_true_closed_questions_to_train_images_only(tmp_path):
    """``train_extra_closed``: 2 more closed questions per train image, of kinds not asked yet, answers from the
    pixels; images, the test split and the first four questions of each image are unchanged."""
    base, extra = tmp_path / "base", tmp_path / "extra"
    generate_synth(base, n_images=40, seed=5, image_size=48)
    m = generate_synth(extra, n_images=40, seed=5, image_size=48, train_extra_closed=2)
    assert m.train_extra_closed == 2 and _load(extra / "manifest.json")["train_extra_closed"] == 2
    assert _load(base / "vqa" / "test.json") == _load(extra / "vqa" / "test.json")
    assert {k: v for k, v in _digests(base).items() if k.startswith("images/")} == {
        k: v for k, v in _digests(extra).items() if k.startswith("images/")
    }
    old, new = _load(base / "vqa" / "train.json"), _load(extra / "vqa" / "train.json")
    assert all(r in new for r in old) and len(new) == len(old) + 2 * m.n_train_images
    pixels = {
        r["image"]: {k: v for k, v in r.items() if k not in ("image", "split")} for r in _jsonl(extra / "factors.jsonl")
    }
    by_image: dict[str, list[dict]] = {}
    for r in new:
        by_image.setdefault(r["image"], []).append(r)
    answers = []
    for image, rows in by_image.items():
        closed = [r for r in rows if r["answer_type"] == "CLOSED"]
        assert len(rows) == 6 and len(closed) == 4, image
        assert len({r["question_type"] for r in closed}) == 4  # distinct kinds: never the same kind asked twice
        assert len({r["id"] for r in rows}) == 6
        for r in closed:
            assert r["conversations"][1]["value"] == closed_answer(r["conversations"][0]["value"], pixels[image])
        answers += [r["conversations"][1]["value"] for r in closed[2:]]
    assert 0.3 < answers.count("yes") / len(answers) < 0.7  # yes and no drawn equally often
    with pytest.raises(MedvlmError, match="train_extra_closed"):
        generate_synth(tmp_path / "x", n_images=20, image_size=48, train_extra_closed=4)


def test_train_closed_kinds_adds_one_closed_question_per_listed_kind_to_train_images(tmp_path, capsys):
    """``train_closed_kinds=("COUNT", "POS")``: every train image gets one more COUNT and one more POS yes/no
    question (also when already asked about that kind), answers from the pixels; the test split is unchanged."""
    from medvlm.cli import main

    base, extra = tmp_path / "base", tmp_path / "kinds"
    generate_synth(base, n_images=40, seed=5, image_size=48)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "data",
                "synth",
                "--out",
                str(extra),
                "--n-images",
                "40",
                "--seed",
                "5",
                "--image-size",
                "48",
                "--train-closed-kinds",
                "COUNT,POS",
            ]
        )
    assert e.value.code in (0, None)
    m = _load(extra / "manifest.json")
    assert m["train_closed_kinds"] == ["COUNT", "POS"] and m["train_extra_closed"] == 0
    assert _load(base / "vqa" / "test.json") == _load(extra / "vqa" / "test.json")
    old, new = _load(base / "vqa" / "train.json"), _load(extra / "vqa" / "train.json")
    added = [r for r in new if r not in old]
    assert all(r in new for r in old) and len(added) == 2 * m["n_train_images"]
    pixels = {r["image"]: r for r in _jsonl(extra / "factors.jsonl")}
    by_image: dict[str, list[str]] = {}
    for r in added:
        assert r["answer_type"] == "CLOSED"
        assert r["conversations"][1]["value"] == closed_answer(r["conversations"][0]["value"], pixels[r["image"]])
        by_image.setdefault(r["image"], []).append(r["question_type"])
    assert (
        all(sorted(kinds) == ["COUNT", "POS"] for kinds in by_image.values()) and len(by_image) == m["n_train_images"]
    )
    with pytest.raises(MedvlmError, match="train_closed_kinds.*SHAPE"):
        generate_synth(tmp_path / "x", n_images=20, image_size=48, train_closed_kinds=("SHAPE",))
