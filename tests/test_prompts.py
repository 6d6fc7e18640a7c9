"""Prompt specs: the model's own sets, the general set, files in the forms people keep them in."""

from __future__ import annotations

import json
import shutil

import pytest

from draft.errors import UserError
from draft.prompts import load_prompts, named_sets


def general(part: str) -> list[str]:
    lines = [line.strip() for line in (named_sets()["animals"].path).read_text().splitlines()]
    cut = lines.index("# heldout")
    chosen = lines[:cut] if part == "train" else lines[cut + 1 :]
    return [line for line in chosen if line and not line.startswith("#")]


def test_shapes_sd_ships_its_own_sets():
    from draft.models import shapes

    assert load_prompts("train", "shapes-sd") == shapes.prompts("train")
    assert load_prompts("heldout", "shapes-sd") == shapes.prompts("heldout")


def test_a_model_without_sets_gets_the_general_animal_split(tiny_sd):
    train, heldout = load_prompts("train", str(tiny_sd)), load_prompts("heldout", str(tiny_sd))
    assert train == general("train") and heldout == general("heldout")
    assert len(train) == 51 and len(heldout) == 15 and not set(train) & set(heldout)
    assert train[:3] == ["cat", "dog", "horse"]  # DDPO's simple-animals list, in its order
    assert load_prompts("animals", str(tiny_sd)) == train + heldout
    # A hub id has no folder to ship sets in: the general split too.
    assert load_prompts("train", "someone/some-model") == train


def test_a_pipeline_folder_may_ship_its_own_sets(tiny_sd, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(tiny_sd, folder)
    (folder / "prompts").mkdir()
    (folder / "prompts" / "train.txt").write_text("# mine\na red fox\n\na blue owl\n")
    (folder / "prompts" / "heldout.txt").write_text("a green frog\n")
    assert load_prompts("train", str(folder)) == ["a red fox", "a blue owl"]
    assert load_prompts("heldout", str(folder)) == ["a green frog"]
    with pytest.raises(UserError) as e:
        load_prompts("trian", str(folder))
    assert "did you mean 'train'" in str(e.value) and "heldout, train (" in str(e.value)


def test_messages_name_only_the_sets_of_the_model_in_use(tiny_sd):
    with pytest.raises(UserError) as e:
        load_prompts("no_such_set", str(tiny_sd))
    msg = str(e.value)
    assert msg.startswith("prompt set or file 'no_such_set' not found")
    assert "shapes" not in msg and "train" in msg and "heldout" in msg and "animals" in msg
    with pytest.raises(UserError) as e:
        load_prompts("no_such_set", "shapes-sd")
    assert "heldout, train (shapes-sd's own); animals (general)" in str(e.value)


def test_inline_single_and_text_file(tmp_path):
    assert load_prompts("a red cat| a blue dog |") == ["a red cat", "a blue dog"]
    assert load_prompts("a red cat") == ["a red cat"]
    f = tmp_path / "p.txt"
    f.write_text("\ufeff# comment\na red cat\n\n  a blue dog  \n")
    assert load_prompts(str(f)) == ["a red cat", "a blue dog"]


def test_csv_and_tsv_columns(tmp_path):
    f = tmp_path / "captions.csv"
    f.write_text('id,prompt,caption\n1,a red cat,"a cat, red"\n2,a blue dog,"a dog\nin blue"\n3,,\n')
    assert load_prompts(str(f)) == ["a red cat", "a blue dog"]  # the 'prompt' column by default
    assert load_prompts(f"{f}:caption") == ["a cat, red", "a dog\nin blue"]  # quoted commas and newlines
    one = tmp_path / "one.csv"
    one.write_text("text\na red cat\na blue dog\n")
    assert load_prompts(str(one)) == ["a red cat", "a blue dog"]  # the only column
    t = tmp_path / "p.tsv"
    t.write_text("n\tprompt\n1\ta red cat\n")
    assert load_prompts(str(t)) == ["a red cat"]


def test_csv_errors_name_the_columns(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("id,caption,source\n1,a red cat,x\n")
    with pytest.raises(UserError, match=r"no column 'prompt'; name the one to read, e\.g\. prompts=.*c\.csv:id "
                                        r"\(columns: id, caption, source\)"):
        load_prompts(str(f))
    with pytest.raises(UserError, match=r"no column 'captoin' \(did you mean 'caption'\?\); columns: id, caption"):
        load_prompts(f"{f}:captoin")
    (tmp_path / "empty.csv").write_text("prompt\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.csv"))


def test_jsonl_fields_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a red cat", "text": "x"}, {"prompt": "a dog", "text": "y"}]))
    assert load_prompts(str(f)) == ["a red cat", "a dog"]
    assert load_prompts(f"{f}:text") == ["x", "y"]
    with pytest.raises(UserError, match=r"d\.jsonl line 1 has no field 'txt' \(did you mean 'text'\?\)"):
        load_prompts(f"{f}:txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_prompts(str(bad))
    bad.write_text('["a"]\n')
    with pytest.raises(UserError, match="line 1 is not a JSON object"):
        load_prompts(str(bad))
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(UserError, match="line 1: field 'prompt' is not text"):
        load_prompts(str(bad))


def test_missing_files_are_reported(tmp_path):
    for spec in (str(tmp_path / "none.txt"), str(tmp_path / "none.csv:caption"), "none.jsonl"):
        with pytest.raises(UserError, match="not found"):
            load_prompts(spec)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_prompts(str(latin))
