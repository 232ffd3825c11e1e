"""Every layout of VQA-RAD / SLAKE / PathVQA (public release, hub parquet / JSON + imgs.zip, hub cache,
datasets Arrow cache) reads to the same converted records."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from bench_helpers import (
    PATH,
    RAD,
    write_datasets_arrow,
    write_hub_cache,
    write_hub_parquet,
    write_rad_public,
    write_slake,
)
from medvlm.data.benchmarks.convert import convert_vqa
from medvlm.data.benchmarks.hub import HUB_REPOS, convert_benchmark, locate
from medvlm.data.benchmarks.zip_images import ZipImages
from medvlm.errors import MedvlmError


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _converted(out: Path) -> dict[str, list[dict]]:
    """Each split's records with the image replaced by the sha256 of its bytes (names may differ by layout)."""
    res = {}
    for split in ("train", "validation", "test"):
        if (out / f"{split}.json").is_file():
            recs = json.loads((out / f"{split}.json").read_text(encoding="utf-8"))
            for r in recs:
                r["image_sha256"] = hashlib.sha256((out / "images" / r["image"]).read_bytes()).hexdigest()
            res[split] = recs
    return res


def _content(recs: list[dict]) -> list[tuple]:
    return [
        (r["conversations"][0]["value"], r["conversations"][1]["value"], r["answer_type"], r["image_sha256"])
        for r in recs
    ]


def test_vqa_rad_release_hub_parquet_hub_cache_and_arrow_cache_agree(tmp_path):
    public = write_rad_public(tmp_path / "release")
    hub = write_hub_parquet(tmp_path / "hub-files", RAD)
    cache = write_hub_cache(tmp_path / "hf" / "hub", HUB_REPOS["vqa-rad"], _files(hub))
    arrow = write_datasets_arrow(tmp_path / "hf" / "datasets", HUB_REPOS["vqa-rad"], RAD)
    layouts = {
        "public": public,
        "hub-parquet": hub,
        "hub-cache": cache,
        "hub-cache-parent": tmp_path / "hf",
        "datasets-arrow": arrow,
    }
    got = {}
    for name, src in layouts.items():
        out = tmp_path / "out" / name
        counts, info = convert_benchmark("vqa-rad", src, out)
        assert counts["test"] == 6 and counts["train"] == 4
        got[name] = (_converted(out), info)
    assert got["public"][1].layout == "public" and got["hub-parquet"][1].layout == "hub-parquet"
    assert got["hub-cache"][1].layout == "hub-parquet" and "snapshots" in str(got["hub-cache"][1].folder)
    assert got["datasets-arrow"][1].layout == "datasets-arrow"
    # The hub copies are byte-identical to each other (ids = row index, images named by split and row).
    for name in ("hub-cache", "hub-cache-parent", "datasets-arrow"):
        assert got[name][0] == got["hub-parquet"][0], name
    # The release has question ids and its own image names; questions, answers, types and image bytes agree.
    for split in ("train", "test"):
        assert _content(got["public"][0][split]) == _content(got["hub-parquet"][0][split])
    assert [r["id"] for r in got["public"][0]["test"]] == [104 + i for i in range(6)]
    assert [r["id"] for r in got["hub-parquet"][0]["test"]] == list(range(6))


def test_slake_release_and_hub_json_zip_agree_record_for_record(tmp_path):
    public = write_slake(tmp_path / "release", hub=False)
    hub = write_slake(tmp_path / "hub-files", hub=True)
    cache = write_hub_cache(tmp_path / "hf", HUB_REPOS["slake"], _files(hub))
    outs = {}
    for name, src in (("public", public), ("hub", hub), ("cache", cache)):
        counts, info = convert_benchmark("slake", src, tmp_path / "out" / name)
        assert counts == {"train": 3, "validation": 1, "test": 6, "images": 6, "open_answers": 2}
        outs[name] = (_converted(tmp_path / "out" / name), info.layout)
    assert outs["public"][1] == "public" and outs["hub"][1] == outs["cache"][1] == "hub-json-zip"
    assert outs["public"][0] == outs["hub"][0] == outs["cache"][0]  # same ids, image names, bytes, fields
    test = outs["hub"][0]["test"]
    assert all(r["id"] != 9999 for r in test)  # the Chinese question is left out
    assert test[0]["modality"] == "X-Ray" and test[0]["question_type"] == "Abnormality"
    # `medvlm data convert slake` reads the hub copy too
    assert convert_vqa("slake", hub, tmp_path / "dc")["test"] == 6


def test_pathvqa_hub_parquet_cache_and_arrow_agree_with_data_convert(tmp_path):
    hub = write_hub_parquet(tmp_path / "hub-files", PATH)
    cache = write_hub_cache(tmp_path / "hf", HUB_REPOS["pathvqa"], _files(hub))
    arrow = write_datasets_arrow(tmp_path / "ds", HUB_REPOS["pathvqa"], PATH)
    convert_vqa("pathvqa", hub, tmp_path / "data-convert")
    reference = _converted(tmp_path / "data-convert")
    assert [r["answer_type"] for r in reference["test"]] == ["CLOSED", "OPEN", "CLOSED", "OPEN", "CLOSED", "OPEN"]
    for name, src in (("hub", hub), ("cache", cache), ("arrow", arrow)):
        counts, _ = convert_benchmark("pathvqa", src, tmp_path / "out" / name)
        assert counts["validation"] == 1
        assert _converted(tmp_path / "out" / name) == reference, name


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(MedvlmError, match="no vqa-rad files"):
        locate("vqa-rad", tmp_path)
    hub = write_hub_parquet(tmp_path / "p", PATH)
    import pyarrow as pa
    import pyarrow.parquet as pq

    (bad,) = (hub / "data").glob("test-00000-of-00001-*.parquet")
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), bad)
    with pytest.raises(MedvlmError, match=r"test-00000-of-00001-\w+.parquet: missing columns \['image'\]"):
        convert_benchmark("pathvqa", hub, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing half-written
    # two cached snapshots and no refs/main: the user is asked to pick one
    cache = write_hub_cache(tmp_path / "hf", HUB_REPOS["pathvqa"], {"README.md": hub / "README.md"})
    repo = cache / "datasets--flaviagiammarino--path-vqa"
    (repo / "snapshots" / ("b" * 40)).mkdir()
    (repo / "refs" / "main").unlink()
    with pytest.raises(MedvlmError, match="2 snapshots and no refs/main"):
        locate("pathvqa", cache)


def test_zip_members_are_bounded(tmp_path):
    zp = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("imgs/a/source.jpg", b"\xff\xd8 jpeg")
        z.writestr("imgs/bomb/source.jpg", b"\0" * 5_000_000)  # compresses ~1000:1
        z.writestr("Slake1.0/imgs/c/source.jpg", b"c")
        z.writestr("__MACOSX/imgs/a/._source.jpg", b"junk")
    with ZipImages(zp, prefix="imgs") as zi:
        assert zi.read("a/source.jpg", "rec 0") == b"\xff\xd8 jpeg"
        assert zi.read("imgs/a/source.jpg", "rec 0") == b"\xff\xd8 jpeg"
        assert zi.read("c/source.jpg", "rec 0") == b"c"
        with pytest.raises(MedvlmError, match="rec 1: .*zip bomb"):
            zi.read("bomb/source.jpg", "rec 1")
        with pytest.raises(MedvlmError, match="rec 2: image name '../x' must be a relative path"):
            zi.read("../x", "rec 2")
        with pytest.raises(MedvlmError, match="rec 3: image 'b/source.jpg' not found"):
            zi.read("b/source.jpg", "rec 3")
