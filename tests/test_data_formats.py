"""Dataset files: the format comes from the extension (.json / .jsonl), a JSONL file of one record
is one record, a UTF-8 BOM is skipped, and every error names the file (and line or record)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arr_jax.data import converters
from arr_jax.data.json_records import data_format, load_records, read_json
from arr_jax.data.preference_tfds import JsonlPairs, read_records

BOM = "\ufeff"


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((BOM if bom else "") + text, encoding="utf-8")
    return path


def images(root: Path) -> tuple[str, str]:
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(np.full((4, 4, 3), 60 * i, np.uint8)).save(root / name)
    return "a.png", "b.png"


def hpd_item(a, b):
    return {"prompt": "a red cat", "path1": a, "path2": b, "model1": "m1", "model2": "m2"}


def mmrb2_item(a, b):
    return {"id": "p0", "chosen": "B", "prompt_content": [["text", "a red cat"]],
            "response_a": {"model_name": "ma", "response_content": [["image", a]]},
            "response_b": {"model_name": "mb", "response_content": [["image", b]]}}


def test_one_record_jsonl_is_one_record(tmp_path):
    a, b = images(tmp_path)
    src = write(tmp_path / "hpd.jsonl", json.dumps(hpd_item(a, b)) + "\n")
    rep = converters.convert_hpdv3(src, tmp_path / "out_hpd")
    assert rep.written == 1 and rep.skipped == {}
    assert [p.prompt for p in JsonlPairs(rep.path)] == ["a red cat"]
    src = write(tmp_path / "mmrb2.jsonl", json.dumps(mmrb2_item(a, b)))      # no trailing newline
    rep = converters.convert_mmrb2(src, tmp_path / "out_mm", task="t2i")
    assert rep.written == 1 and rep.skipped == {}
    assert JsonlPairs(rep.path)[0].label == 2
    er = {"id": "e0", "instruction": "make it red", "dataset": "2pair", "ranking": "B>A",
          "source_image": a, "candidate_1": a, "candidate_2": b}
    rep = converters.convert_editreward_bench(write(tmp_path / "er.jsonl", json.dumps(er) + "\n"), tmp_path / "out_er")
    assert rep.written == 1 and JsonlPairs(rep.path)[0].label == 2
    pairs = write(tmp_path / "pairs.jsonl", json.dumps({"prompt": "x", "image1": a, "image2": b, "label": "B"}))
    assert [r["label"] for r in read_records(pairs)] == [2]


def test_byte_order_mark_is_skipped(tmp_path):
    a, b = images(tmp_path)
    rep = converters.convert_hpdv3(write(tmp_path / "test.json", json.dumps([hpd_item(a, b)]), bom=True),
                                   tmp_path / "o1")
    assert rep.written == 1
    rep = converters.convert_mmrb2(write(tmp_path / "t2i.json", json.dumps({"pairs": [mmrb2_item(a, b)]}), bom=True),
                                   tmp_path / "o2")
    assert rep.written == 1
    rep = converters.convert_hpdv3(write(tmp_path / "bom.jsonl", json.dumps(hpd_item(a, b)) + "\n", bom=True),
                                   tmp_path / "o3")
    assert rep.written == 1
    pairs = write(tmp_path / "pairs.jsonl", json.dumps({"prompt": "x", "image1": a, "image2": b, "label": 1}), bom=True)
    assert len(read_records(pairs)) == 1


def test_syntax_errors_name_the_file_and_line(tmp_path):
    bad = write(tmp_path / "broken.json", '[{"prompt": "x",\n  "path1": }]')
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:2:12: not valid JSON"):
        converters.convert_hpdv3(bad, tmp_path / "o")
    bad = write(tmp_path / "broken.jsonl", '{"prompt": "x"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:3:\d+: not valid JSON"):
        converters.convert_hpdv3(bad, tmp_path / "o")
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:3:"):
        read_records(bad)
    empty = write(tmp_path / "empty.json", "")
    with pytest.raises(ValueError, match=rf"{re.escape(str(empty))}:1:1: not valid JSON"):
        read_json(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(latin))}: not UTF-8"):
        load_records(latin)


def test_content_that_disagrees_with_the_extension(tmp_path):
    a, b = images(tmp_path)
    lines = write(tmp_path / "lines.json", json.dumps(hpd_item(a, b)) + "\n" + json.dumps(hpd_item(b, a)) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(lines))}:2: .*JSON Lines.*rename it to \.jsonl"):
        converters.convert_hpdv3(lines, tmp_path / "o")
    pretty = write(tmp_path / "pretty.jsonl", json.dumps([hpd_item(a, b)], indent=2))
    with pytest.raises(ValueError, match=rf"{re.escape(str(pretty))}:1: not one JSON value per line.*rename it to "
                                         r"\.json"):
        converters.convert_hpdv3(pretty, tmp_path / "o")
    one_line_array = write(tmp_path / "array.jsonl", json.dumps([hpd_item(a, b)]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(one_line_array))}:1: expected a JSON object per line, "
                                         r"got an array \(a JSON array of records belongs in a \.json file\)"):
        converters.convert_hpdv3(one_line_array, tmp_path / "o")
    other = write(tmp_path / "pairs.txt", json.dumps(hpd_item(a, b)))
    with pytest.raises(ValueError, match=rf"{re.escape(str(other))}: unknown data file extension '\.txt'"):
        converters.convert_hpdv3(other, tmp_path / "o")
    assert data_format("x/y.JSONL") == "jsonl" and data_format("y.json") == "json"


def test_container_types_are_checked_and_named(tmp_path):
    a, b = images(tmp_path)
    obj = write(tmp_path / "one.json", json.dumps(hpd_item(a, b)))                    # an object, not an array
    with pytest.raises(ValueError, match=rf"{re.escape(str(obj))}: expected a JSON array of records, got an object "
                                         r"\(one object per line belongs in a \.jsonl file\)"):
        converters.convert_hpdv3(obj, tmp_path / "o")
    nopairs = write(tmp_path / "t2i.json", json.dumps({"items": [mmrb2_item(a, b)]}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(nopairs))}: expected a JSON array of records or an object "
                                         r"with a 'pairs' array; got an object with keys \['items'\]"):
        converters.convert_mmrb2(nopairs, tmp_path / "o")
    pairs_str = write(tmp_path / "edit.json", json.dumps({"pairs": "none"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(pairs_str))}: 'pairs' must be a JSON array of records, "
                                         r"got a string"):
        converters.convert_mmrb2(pairs_str, tmp_path / "o", task="edit")
    mixed = write(tmp_path / "mixed.json", json.dumps({"pairs": [mmrb2_item(a, b), ["A", "B"]]}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(mixed))}: pairs\[1\]: expected a JSON object, got an array"):
        converters.convert_mmrb2(mixed, tmp_path / "o")
    strings = write(tmp_path / "records.json", json.dumps([hpd_item(a, b), "prompt path1 path2"]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(strings))}: record 1: expected a JSON object, got a string"):
        converters.convert_hpdv3(strings, tmp_path / "o")
    # the pairs reader: a string record used to pass the field check by substring
    line = write(tmp_path / "pairs.jsonl", json.dumps({"prompt": "x", "image1": a, "image2": b, "label": 1}) + "\n"
                 + json.dumps("prompt image1 image2 label") + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(line))}:2: expected a JSON object per line, got a string"):
        read_records(line)


def test_pairs_file_as_a_json_array(tmp_path):
    a, b = images(tmp_path)
    recs = [{"prompt": "x", "image1": a, "image2": b, "label": 1}, {"prompt": "y", "image1": b, "image2": a,
                                                                    "label": "A"}]
    arr = write(tmp_path / "pairs.json", json.dumps(recs))
    got = read_records(arr)
    assert [r["id"] for r in got] == ["pairs-1", "pairs-2"] and [r["label"] for r in got] == [1, 1]
    recs[1].pop("label")
    with pytest.raises(ValueError, match=rf"{re.escape(str(arr))}: record 1: missing field 'label'"):
        read_records(write(arr, json.dumps(recs)))
