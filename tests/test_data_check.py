"""`python -m llava.data.check` finds each fault planted in a generated dataset, and --fix repairs extensions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_helpers import draw, make_dataset

from llava.data.check import main

LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)


@pytest.fixture
def planted(tmp_path):
    """A clean generated dataset plus one record per fault; returns (data_path, image_folder, {fault: index})."""
    data_path, folder = make_dataset(str(tmp_path), n_image=6, n_text=2, style="chat")
    records = json.load(open(data_path))
    faults = {}

    def add(name, record):
        faults[name] = len(records)
        records.append(record)

    def conv(image, user="<image>\nWhat is in the picture?", reply="A red square."):
        rec = {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": reply}]}
        if image is not None:
            rec["image"] = image
        return rec

    add("schema", {"id": "no-turns", "image": "000_0.png"})
    add("image count", conv(["000_0.png", "001_0.png"]))
    add("missing image", conv("does_not_exist.png"))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    add("undecodable image", conv("broken.png"))
    os.makedirs(os.path.join(folder, "ocr_vqa", "images"), exist_ok=True)
    draw("red", "square").save(os.path.join(folder, "ocr_vqa", "images", "140031996.gif"))
    draw("blue", "circle").save(os.path.join(folder, "ocr_vqa", "images", "140032001.png"))
    add("wrong extension", conv("ocr_vqa/images/140031996.jpg"))
    faults["wrong extension 2"] = len(records)
    records.append(conv("ocr_vqa/images/140032001.jpg"))
    add("too long (cut)", conv("000_0.png", reply=LONG))
    add("no supervised token", conv("001_0.png", user="<image>\n" + LONG))
    with open(data_path, "w") as f:
        json.dump(records, f)
    return data_path, folder, faults


def table_rows(text: str) -> dict[str, tuple[int, str, str]]:
    rows = {}
    for line in text.splitlines()[2:]:
        name, rest = line[:22].strip(), line[22:].split(None, 2)
        if len(rest) >= 2 and rest[0].isdigit():
            rows[name] = (int(rest[0]), rest[1], rest[2] if len(rest) > 2 else "")
    return rows


def test_finds_every_planted_fault(tiny, planted, capsys):
    data_path, folder, faults = planted
    argv = ["--data_path", data_path, "--image_folder", folder, "--model_name_or_path", tiny.tokenizer_dir]
    code = main(argv + ["--version", "v1", "--model_max_length", "256", "--vision_tower", tiny.clip_dir])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert code == 1
    for name in ("schema", "image count", "missing image", "undecodable image", "no supervised token"):
        count, status, example = rows[name]
        assert (count, status) == (1, "ERROR"), (name, out)
        assert example.startswith(f"record {faults[name]}:"), (name, out)
    assert rows["wrong extension"][:2] == (2, "ERROR")
    assert "`ocr_vqa/images/140031996.jpg` is listed, `140031996.gif` is on disk" in out
    assert rows["too long (cut)"][:2] == (2, "warning")  # the long reply and the long question
    assert "does_not_exist.png" in out and "broken.png" in out
    assert f"{len(json.load(open(data_path)))} records" in out


def test_fix_rewrites_wrong_extensions(planted, capsys, tmp_path):
    data_path, folder, faults = planted
    fixed = str(tmp_path / "fixed.json")
    main(["--data_path", data_path, "--image_folder", folder, "--fix", "--output", fixed])
    out = capsys.readouterr().out
    assert "Fixed 2 image path(s)" in out and fixed in out
    records = json.load(open(fixed))
    assert records[faults["wrong extension"]]["image"] == "ocr_vqa/images/140031996.gif"
    assert records[faults["wrong extension 2"]]["image"] == "ocr_vqa/images/140032001.png"
    assert json.load(open(data_path))[faults["wrong extension"]]["image"].endswith(".jpg")  # original untouched
    main(["--data_path", fixed, "--image_folder", folder])
    rows = table_rows(capsys.readouterr().out)
    assert rows["wrong extension"][:2] == (0, "ok") and rows["missing image"][0] == 1
    assert rows["too long (cut)"][1] == "skipped"  # no tokenizer given


def test_clean_dataset_exits_zero_from_the_command_line(tiny, tmp_path):
    data_path, folder = make_dataset(str(tmp_path), n_image=4, n_text=2, n_multi=1, style="chat", fmt="hf")
    cmd = [sys.executable, "-m", "llava.data.check", "--data_path", data_path, "--image_folder", folder]
    cmd += ["--model_name_or_path", tiny.tokenizer_dir, "--image_tokens", "16", "--version", "v1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 records, 7 without errors" in result.stdout
