"""Tests for romebatch.manifest: formats, validation rules, hashing, speed. No model needed."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from romebatch.errors import ManifestError, UserError
from romebatch.manifest import (
    MAX_FIELD_CHARS,
    Fact,
    Manifest,
    Neighbor,
    fact_from_dict,
    load_manifest,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

HEADER = "id,subject,prompt,target_new,target_true,paraphrases,neighborhood_prompts,neighborhood_answers\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path: Path, name: str, data) -> Path:
    return write(tmp_path, name, json.dumps(data))


def write_yaml_records(tmp_path: Path, records: list[dict], name: str = "facts.yaml") -> Path:
    # JSON is valid YAML; this keeps fixtures exact without hand-indenting YAML.
    return write(tmp_path, name, json.dumps(records, indent=1))


def problems_of(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kwargs)
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    return info.value.problems


def only_problem(path: Path, **kwargs) -> str:
    problems = problems_of(path, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


def assert_located(line: str, path: Path, row: int | None, field: str | None, *fragments: str) -> None:
    prefix = f"{path}:{row}" if row is not None else f"{path}"
    assert line.startswith(prefix + ":"), line
    if field is not None:
        assert f"field '{field}'" in line, line
    for fragment in fragments:
        assert fragment in line, line


GOOD = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English"}


def rec(**changes) -> dict:
    out = dict(GOOD)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()


# ---------------------------------------------------------------------------------------
# CSV


def test_csv_all_columns(tmp_path):
    path = write(
        tmp_path,
        "m.csv",
        HEADER
        + "a1,Danielle Darrieux,The mother tongue of {} is,English,French,"
        + "Where {} is from people speak|{} grew up speaking,Michel Rocard is a native speaker of|Paris is in,French|France\n"
        + ',Eiffel Tower,The Eiffel Tower is in,Rome,,"[""x|y {}"", ""z""]",,\n',
    )
    m = load_manifest(path)
    assert isinstance(m, Manifest) and m.format == "csv" and m.duplicates_dropped == 0 and m.skipped == []
    first, second = m.facts
    assert first == Fact(
        id="a1",
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="English",
        target_true="French",
        paraphrases=("Where Danielle Darrieux is from people speak", "Danielle Darrieux grew up speaking"),
        neighborhood=(Neighbor("Michel Rocard is a native speaker of", "French"), Neighbor("Paris is in", "France")),
        source=f"{path}:2",
    )
    # Default id is the line number; the prompt had the subject filled in.
    assert second.id == "3" and second.prompt == "The {} is in" and second.text == "The Eiffel Tower is in"
    assert second.target_true is None and second.neighborhood == ()
    # A cell starting with "[" is JSON, so "|" can appear inside an item.
    assert second.paraphrases == ("x|y Eiffel Tower", "z")


def test_csv_pipe_items_are_trimmed(tmp_path):
    path = write(tmp_path, "m.csv", "subject,prompt,target_new,paraphrases\nX,{} is,a, one {} | two {} \n")
    assert load_manifest(path).facts[0].paraphrases == ("one X", "two X")


def test_csv_row_numbers_are_editor_lines(tmp_path):
    # Line 2 holds a quoted cell spanning two lines, so the next record starts on line 4;
    # a blank line 5 is skipped, so the bad record is on line 6.
    path = write(
        tmp_path,
        "m.csv",
        'subject,prompt,target_new\nX,"The {}\nis",a\nY,{} is,b\n\nZ,{} is,\n',
    )
    line = only_problem(path)
    assert_located(line, path, 6, "target_new", "empty target")


def test_csv_unknown_column(tmp_path):
    path = write(tmp_path, "m.csv", "subject,prompt,target_new,colour\nX,{} is,a,red\n")
    assert_located(only_problem(path), path, 1, "colour", "unknown column")


def test_csv_missing_required_column(tmp_path):
    path = write(tmp_path, "m.csv", "subject,target_new\nX,a\n")
    assert_located(only_problem(path), path, 1, "prompt", "required column missing")


def test_csv_neighborhood_counts_must_match(tmp_path):
    path = write(
        tmp_path,
        "m.csv",
        "subject,prompt,target_new,neighborhood_prompts,neighborhood_answers\nX,{} is,a,P is|Q is,b\n",
    )
    assert_located(only_problem(path), path, 2, "neighborhood_answers", "has 1 items", "has 2")


def test_csv_bad_json_list_cell(tmp_path):
    path = write(tmp_path, "m.csv", 'subject,prompt,target_new,paraphrases\nX,{} is,a,"[""unterminated"\n')
    assert_located(only_problem(path), path, 2, "paraphrases", "JSON list")


def test_csv_json_list_of_non_strings(tmp_path):
    path = write(tmp_path, "m.csv", 'subject,prompt,target_new,paraphrases\nX,{} is,a,"[1, ""ok""]"\n')
    assert_located(only_problem(path), path, 2, "paraphrases", "item 1", "must be a string")


def test_csv_too_many_cells(tmp_path):
    path = write(tmp_path, "m.csv", "subject,prompt,target_new\nX,{} is,a,extra\n")
    assert_located(only_problem(path), path, 2, None, "4 cells", "3 columns")


def test_csv_malformed_quoting_is_one_line(tmp_path):
    path = write(tmp_path, "m.csv", 'subject,prompt,target_new\nX,{} is,a\nY,"{} is,b\nZ,{} is,c\n')
    assert_located(only_problem(path), path, 3, None, "malformed CSV")


def test_csv_with_bom(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffsubject,prompt,target_new\nX,{} is,a\n".encode("utf-8"))
    assert load_manifest(path).facts[0].subject == "X"


# ---------------------------------------------------------------------------------------
# YAML


YAML_TEXT = """\
facts:
  - id: darrieux
    subject: Danielle Darrieux
    prompt: "The mother tongue of {} is"
    target_new: English
    target_true: French
    paraphrases:
      - "Where {} is from, people speak"
    neighborhood:
      - prompt: Michel Rocard is a native speaker of
        answer: French
  - subject: Eiffel Tower
    prompt: The Eiffel Tower is located in
    target_new: Rome
"""


@pytest.mark.parametrize("ext", [".yaml", ".yml"])
def test_yaml_mapping_with_facts_key(tmp_path, ext):
    path = write(tmp_path, "m" + ext, YAML_TEXT)
    m = load_manifest(path)
    assert m.format == "yaml"
    first, second = m.facts
    assert first.id == "darrieux" and first.target_true == "French"
    assert first.paraphrases == ("Where Danielle Darrieux is from, people speak",)
    assert first.neighborhood == (Neighbor("Michel Rocard is a native speaker of", "French"),)
    assert second.id == "2" and second.source == f"{path}:2" and second.prompt == "The {} is located in"


def test_yaml_bare_list(tmp_path):
    path = write(tmp_path, "m.yaml", "- subject: X\n  prompt: '{} is'\n  target_new: a\n")
    assert [f.text for f in load_manifest(path).facts] == ["X is"]


def test_yaml_unknown_key(tmp_path):
    path = write_yaml_records(tmp_path, [rec(), rec(subject="Y", prompt="{} speaks", targte_true="x")])
    assert_located(only_problem(path), path, 2, "targte_true", "unknown field")


def test_yaml_unknown_neighborhood_key(tmp_path):
    path = write_yaml_records(tmp_path, [rec(neighborhood=[{"prompt": "P is", "answer": "x", "weight": 2}])])
    assert_located(only_problem(path), path, 1, "neighborhood", "item 1", "unknown key 'weight'")


def test_yaml_unquoted_number_is_not_a_string(tmp_path):
    path = write(tmp_path, "m.yaml", "- subject: Jamal Malik\n  prompt: '{} was born in'\n  target_new: 1956\n")
    assert_located(only_problem(path), path, 1, "target_new", "must be a string", "int")


def test_yaml_python_tag_is_rejected_and_nothing_is_constructed(tmp_path):
    marker = tmp_path / "constructed"
    path = write(
        tmp_path,
        "evil.yaml",
        f"- !!python/object/apply:builtins.open ['{marker}', 'w']\n- !!python/object:collections.OrderedDict {{}}\n",
    )
    line = only_problem(path)
    assert_located(line, path, 1, None, "invalid YAML")
    assert not marker.exists()


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "m.yaml", "- subject: X\n  prompt: '{} is'\n   target_new: [a\n")
    line = only_problem(path)
    assert line.startswith(f"{path}:") and "invalid YAML" in line


def test_yaml_top_level_must_hold_facts(tmp_path):
    path = write(tmp_path, "m.yaml", "fact:\n  - subject: X\n")
    problems = problems_of(path)
    assert any("'fact'" in p and "unknown top-level key" in p for p in problems)
    assert any("'facts' key" in p for p in problems)


# ---------------------------------------------------------------------------------------
# JSONL and generic JSON


def test_jsonl_rows_are_line_numbers_and_blank_lines_skipped(tmp_path):
    lines = [json.dumps(rec()), "", json.dumps(rec(subject="Y", prompt="{} speaks", target_new=" ")), "{broken"]
    path = write(tmp_path, "m.jsonl", "\n".join(lines) + "\n")
    problems = problems_of(path)
    assert len(problems) == 2
    assert_located(problems[0], path, 3, "target_new", "empty target")
    assert_located(problems[1], path, 4, None, "invalid JSON")


def test_jsonl_loads(tmp_path):
    path = write(
        tmp_path, "m.jsonl", json.dumps(rec(id=7)) + "\n\n" + json.dumps(rec(subject="Y", prompt="{} is")) + "\n"
    )
    m = load_manifest(path)
    assert m.format == "jsonl" and [f.id for f in m.facts] == ["7", "3"]


def test_json_generic_records(tmp_path):
    path = write_json(tmp_path, "m.json", [rec(target_true="French", paraphrases=["{} speaks"])])
    m = load_manifest(path)
    assert m.format == "json" and m.facts[0].paraphrases == ("Danielle Darrieux speaks",)


def test_json_mapping_with_facts_key(tmp_path):
    path = write_json(tmp_path, "m.json", {"facts": [rec()]})
    assert len(load_manifest(path).facts) == 1


def test_json_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "m.json", '[\n {"subject": "X",\n  "prompt": }\n]')
    assert_located(only_problem(path), path, 3, None, "invalid JSON")


COUNTERFACT_ORIGINAL = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
    ],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Robert Schuman is a native speaker of"],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


def test_json_counterfact_original(tmp_path):
    second = json.loads(json.dumps(COUNTERFACT_ORIGINAL))
    second["case_id"] = 5
    second["requested_rewrite"]["target_new"]["str"] = "French"
    path = write_json(tmp_path, "cf.json", [COUNTERFACT_ORIGINAL, second])
    m = load_manifest(path, skip_invalid=True)
    assert m.format == "counterfact"
    (fact,) = m.facts
    assert fact.id == "0" and fact.prompt == "The mother tongue of {} is" and fact.target_true == "French"
    assert fact.paraphrases == tuple(COUNTERFACT_ORIGINAL["paraphrase_prompts"])
    # A CounterFact neighbourhood prompt should still complete to the true object.
    assert fact.neighborhood == (
        Neighbor("Michel Rocard is a native speaker of", "French"),
        Neighbor("Robert Schuman is a native speaker of", "French"),
    )
    (skipped,) = m.skipped
    assert_located(skipped, path, 2, "requested_rewrite.target_true.str", "equals target_new")


def test_json_counterfact_original_missing_rewrite_field(tmp_path):
    bad = json.loads(json.dumps(COUNTERFACT_ORIGINAL))
    del bad["requested_rewrite"]["subject"]
    path = write_json(tmp_path, "cf.json", [COUNTERFACT_ORIGINAL, bad])
    assert_located(only_problem(path), path, 2, "requested_rewrite.subject", "missing")


FLAT_RECORD = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}


def test_json_counterfact_flat(tmp_path):
    path = write_json(tmp_path, "cf.json", [FLAT_RECORD])
    m = load_manifest(path)
    assert m.format == "counterfact-flat"
    assert m.facts[0] == Fact(
        id="0",
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="English",
        target_true="French",
        paraphrases=("Where Danielle Darrieux is from, people speak the language of",),
        neighborhood=(Neighbor("Michel Rocard is a native speaker of", "French"),),
        source=f"{path}:1",
    )


def test_json_counterfact_flat_subject_case_mismatch(tmp_path):
    bad = dict(FLAT_RECORD, case_id=1, subject="danielle darrieux")
    path = write_json(tmp_path, "cf.json", [FLAT_RECORD, bad])
    assert_located(only_problem(path), path, 2, "prompt", "subject 'danielle darrieux' not found in prompt")


def test_json_counterfact_flat_half_a_locality_probe(tmp_path):
    bad = {k: v for k, v in FLAT_RECORD.items() if k != "locality_ground_truth"}
    path = write_json(tmp_path, "cf.json", [bad])
    assert_located(only_problem(path), path, 1, "locality_ground_truth", "missing")


ZSRE_RECORD = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}


def test_json_zsre(tmp_path):
    missing = dict(ZSRE_RECORD, subject="Unifirst Corp")
    empty_alt = dict(ZSRE_RECORD, subject="Michaela Staniford", src="What gender is Michaela Staniford?", alt="")
    path = write_json(tmp_path, "zsre.json", [ZSRE_RECORD, missing, empty_alt])
    problems = problems_of(path)
    assert len(problems) == 2
    assert_located(problems[0], path, 2, "src", "subject 'Unifirst Corp' not found in prompt")
    assert_located(problems[1], path, 3, "alt", "empty target")
    m = load_manifest(path, skip_invalid=True)
    assert m.format == "zsre" and len(m.skipped) == 2
    assert m.facts == [
        Fact(
            id="1",
            subject="UniFirst",
            prompt="What is the product made by {}?",
            target_new="unmanned aircraft",
            target_true="uniform",
            paraphrases=("What will be the product of UniFirst?",),
            neighborhood=(Neighbor("nq question: john goodman's character in the big lebowski", "Walter Sobchak"),),
            source=f"{path}:1",
        )
    ]


@pytest.mark.skipif(not (SHARED_DATA / "counterfact-edit-10k.json").exists(), reason="shared data absent")
def test_real_counterfact_flat_file():
    path = SHARED_DATA / "counterfact-edit-10k.json"
    problems = problems_of(path)
    # CounterFact reuses a prompt (e.g. "Tirana is a twin city of") with different new
    # targets in different cases; those cannot be applied in one batch.
    assert problems and all("conflicting targets" in p for p in problems)
    m = load_manifest(path, skip_invalid=True)
    assert m.format == "counterfact-flat"
    assert len(m.facts) + m.duplicates_dropped + len(m.skipped) == 10_000
    assert len(m.skipped) == len(problems)
    assert len(m.facts) > 9_800


@pytest.mark.skipif(not (SHARED_DATA / "zsre-1k.json").exists(), reason="shared data absent")
def test_real_zsre_file():
    m = load_manifest(SHARED_DATA / "zsre-1k.json", skip_invalid=True)
    assert m.format == "zsre"
    assert len(m.facts) + m.duplicates_dropped + len(m.skipped) == 1_000
    assert all("empty target" in s or "equals target_new" in s for s in m.skipped)
    assert len(m.facts) > 950


# ---------------------------------------------------------------------------------------
# File-level problems: one line each, no traceback


def test_unsupported_extension(tmp_path):
    path = write(tmp_path, "m.txt", "hello")
    assert_located(only_problem(path), path, None, None, "unsupported file type '.txt'")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    assert_located(only_problem(path), path, None, None, "cannot read file")


def test_directory_is_not_a_manifest(tmp_path):
    path = tmp_path / "dir.yaml"
    path.mkdir()
    assert_located(only_problem(path), path, None, None, "is a folder, not a regular file")


@pytest.mark.parametrize("name", ["m.csv", "m.yaml", "m.jsonl", "m.json"])
def test_invalid_utf8_is_one_line(tmp_path, name):
    good = {
        "m.csv": b"subject,prompt,target_new\nX,{} is,a\n",
        "m.yaml": b"- subject: X\n  prompt: '{} is'\n  target_new: a\n",
        "m.jsonl": b'{"subject": "X", "prompt": "{} is", "target_new": "a"}\n',
        "m.json": b'[{"subject": "X", "prompt": "{} is",\n "target_new": "a"}]\n',
    }[name]
    path = tmp_path / name
    path.write_bytes(good + b"Caf\xe9 \xff\n")
    line = only_problem(path)
    expected_line = good.count(b"\n") + 1
    assert_located(line, path, expected_line, None, "not valid UTF-8")


@pytest.mark.parametrize(
    "name,text", [("m.csv", ""), ("m.csv", HEADER), ("m.yaml", ""), ("m.json", "[]"), ("m.jsonl", "\n")]
)
def test_empty_manifest(tmp_path, name, text):
    path = write(tmp_path, name, text)
    line = only_problem(path)
    assert line.startswith(str(path)) and ("no facts" in line or "empty" in line)


# ---------------------------------------------------------------------------------------
# Validation rules, one per test


@pytest.mark.parametrize("field", ["subject", "prompt", "target_new"])
def test_required_field_missing(tmp_path, field):
    path = write_yaml_records(tmp_path, [rec(), rec(**{field: _DROP})])
    assert_located(only_problem(path), path, 2, field, "missing")


@pytest.mark.parametrize("field", ["subject", "prompt", "target_new", "target_true"])
def test_field_not_a_string(tmp_path, field):
    path = write_yaml_records(tmp_path, [rec(**{field: ["x"]})])
    assert_located(only_problem(path), path, 1, field, "must be a string", "list")


@pytest.mark.parametrize("value,fragment", [("Where is {}?", "list of strings"), (["ok", 3], "item 2")])
def test_list_field_not_list_of_strings(tmp_path, value, fragment):
    path = write_yaml_records(tmp_path, [rec(paraphrases=value)])
    assert_located(only_problem(path), path, 1, "paraphrases", fragment)


def test_neighborhood_not_a_list_of_mappings(tmp_path):
    path = write_yaml_records(tmp_path, [rec(neighborhood=["Michel Rocard is a native speaker of"])])
    assert_located(only_problem(path), path, 1, "neighborhood", "item 1", "mapping")


def test_neighborhood_item_missing_answer(tmp_path):
    path = write_yaml_records(tmp_path, [rec(neighborhood=[{"prompt": "P is"}])])
    assert_located(only_problem(path), path, 1, "neighborhood", "item 1 answer", "missing")


def test_prompt_with_two_placeholders(tmp_path):
    path = write_yaml_records(tmp_path, [rec(prompt="{} and {} speak")])
    assert_located(only_problem(path), path, 1, "prompt", "2 times")


@pytest.mark.parametrize("prompt", ["The {0} of {} is", "The mother tongue of {subject} is", "{} is } odd"])
def test_prompt_with_other_braces(tmp_path, prompt):
    path = write_yaml_records(tmp_path, [rec(prompt=prompt)])
    assert_located(only_problem(path), path, 1, "prompt", "braces")


def test_prompt_without_placeholder_gets_first_occurrence_of_subject(tmp_path):
    path = write_yaml_records(tmp_path, [rec(subject="Paris", prompt="Paris, like Paris, is in", target_new="Italy")])
    fact = load_manifest(path).facts[0]
    assert fact.prompt == "{}, like Paris, is in" and fact.text == "Paris, like Paris, is in"


def test_subject_not_found_in_prompt(tmp_path):
    path = write_yaml_records(tmp_path, [rec(prompt="The mother tongue of danielle darrieux is")])
    assert_located(only_problem(path), path, 1, "prompt", "subject 'Danielle Darrieux' not found in prompt")


def test_empty_subject(tmp_path):
    path = write_yaml_records(tmp_path, [rec(subject="   ")])
    assert_located(only_problem(path), path, 1, "subject", "empty subject")


def test_empty_target(tmp_path):
    path = write_yaml_records(tmp_path, [rec(target_new=" \t")])
    assert_located(only_problem(path), path, 1, "target_new", "empty target")


def test_empty_target_true(tmp_path):
    path = write_yaml_records(tmp_path, [rec(target_true="  ")])
    assert_located(only_problem(path), path, 1, "target_true", "empty target")


def test_target_true_equal_to_target_new(tmp_path):
    path = write_yaml_records(tmp_path, [rec(target_true=" English ")])
    assert_located(only_problem(path), path, 1, "target_true", "equals target_new")


def test_empty_paraphrase_item(tmp_path):
    path = write(tmp_path, "m.csv", "subject,prompt,target_new,paraphrases\nX,{} is,a,one {}||two\n")
    assert_located(only_problem(path), path, 2, "paraphrases", "item 2", "empty paraphrase")


def test_neighborhood_prompt_with_placeholder(tmp_path):
    path = write_yaml_records(tmp_path, [rec(neighborhood=[{"prompt": "{} is", "answer": "x"}])])
    assert_located(only_problem(path), path, 1, "neighborhood", "item 1 prompt", "'{}' is not allowed")


def test_duplicate_id_names_first_row(tmp_path):
    path = write(tmp_path, "m.csv", "id,subject,prompt,target_new\nk,X,{} is,a\nj,Y,{} is,b\nk,Z,{} is,c\n")
    assert_located(only_problem(path), path, 4, "id", "duplicate id 'k'", "line 2")


def test_conflicting_targets_names_both_rows(tmp_path):
    path = write_yaml_records(tmp_path, [rec(), rec(subject="Y", prompt="{} is"), rec(target_new="German", id="other")])
    line = only_problem(path)
    assert_located(line, path, 3, "target_new", "conflicting targets", "'German'", "'English'", "record 1")


def test_conflict_detected_across_prompt_spellings(tmp_path):
    # Same template once with "{}" and once with the subject filled in.
    path = write_yaml_records(
        tmp_path, [rec(), rec(prompt="The mother tongue of Danielle Darrieux is", target_new="Dutch")]
    )
    assert_located(only_problem(path), path, 2, "target_new", "conflicting targets")


def test_exact_duplicate_dropped_whatever_the_ids(tmp_path):
    path = write(
        tmp_path,
        "m.csv",
        "id,subject,prompt,target_new,paraphrases\n"
        "a,X,{} is,v,\n"
        "b,X,X is,v,X again\n"  # same edit, other id and probes: still a duplicate
        "a,X,{} is,v,\n"  # same id and same edit: a duplicate, not an id clash
        "c,Y,{} is,v,\n",
    )
    m = load_manifest(path)
    assert [f.id for f in m.facts] == ["a", "c"]
    assert m.duplicates_dropped == 2
    assert m.facts[0].paraphrases == ()  # the first occurrence wins


def test_whitespace_normalisation(tmp_path):
    path = write_yaml_records(
        tmp_path,
        [
            rec(
                subject="  Danielle Darrieux ",
                prompt="  The mother tongue of {} is  ",
                target_new=" English\n",
                target_true=" French ",
            )
        ],
    )
    fact = load_manifest(path).facts[0]
    assert fact.subject == "Danielle Darrieux" and fact.target_new == "English" and fact.target_true == "French"
    assert fact.prompt == "  The mother tongue of {} is"  # leading kept, trailing stripped


def test_huge_field_is_an_error_not_a_crash(tmp_path):
    huge = "x" * (MAX_FIELD_CHARS + 1)
    path = write(
        tmp_path,
        "m.csv",
        f"subject,prompt,target_new,paraphrases\n{huge},{{}} is,a,\nX,{{}} is,b,short|{huge}\n",
    )
    problems = problems_of(path)
    assert len(problems) == 2
    assert_located(problems[0], path, 2, "subject", "10,001 characters")
    assert_located(problems[1], path, 3, "paraphrases", "item 2", "10,001 characters")


def test_all_problems_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        "m.csv",
        "id,subject,prompt,target_new,target_true\n"
        "1,X,{} is,a,\n"
        "2,,{} is,b,\n"  # empty subject
        "3,Y,{} {} is,,\n"  # two placeholders AND empty target: two lines for one row
        "4,Z,Q is,c,c\n"  # subject missing from prompt AND target_true == target_new
        "1,W,{} is,d,\n",  # duplicate id
    )
    problems = problems_of(path)
    rows = [int(p[len(str(path)) + 1 :].split(":")[0]) for p in problems]
    assert rows == [3, 4, 4, 5, 5, 6]
    assert sum("empty subject" in p for p in problems) == 1
    assert sum("duplicate id" in p for p in problems) == 1


def test_cross_record_checks_also_run_on_records_with_other_problems(tmp_path):
    path = write(tmp_path, "m.csv", "id,subject,prompt,target_new,paraphrases\nk,X,{} is,a,\nk,X,X is,e,p||q\n")
    problems = problems_of(path)
    assert len(problems) == 3
    assert_located(problems[0], path, 3, "paraphrases", "item 2", "empty paraphrase")
    assert_located(problems[1], path, 3, "id", "duplicate id 'k'", "line 2")
    assert_located(problems[2], path, 3, "target_new", "conflicting targets", "line 2")


def test_invalid_copy_of_an_earlier_edit_is_reported_not_dropped(tmp_path):
    path = write(tmp_path, "m.csv", "id,subject,prompt,target_new,paraphrases\nk,X,{} is,a,\nk,X,{} is,a,p||q\n")
    assert_located(only_problem(path), path, 3, "paraphrases", "empty paraphrase")


def test_skip_invalid_keeps_the_good_records(tmp_path):
    path = write(tmp_path, "m.csv", "subject,prompt,target_new\nX,{} is,a\n,{} is,b\nZ,Q is,c\nW,{} is,d\n")
    m = load_manifest(path, skip_invalid=True)
    assert [f.subject for f in m.facts] == ["X", "W"]
    assert len(m.skipped) == 2
    assert_located(m.skipped[0], path, 3, "subject", "empty subject")
    assert_located(m.skipped[1], path, 4, "prompt", "not found in prompt")


def test_skip_invalid_still_raises_for_an_unreadable_file(tmp_path):
    path = write(tmp_path, "m.json", "[{")
    assert "invalid JSON" in only_problem(path, skip_invalid=True)


def test_limit_applies_after_validation(tmp_path):
    path = write(tmp_path, "m.csv", "subject,prompt,target_new\nX,{} is,a\nY,{} is,b\nZ,{} is,\n")
    assert_located(only_problem(path, limit=1), path, 4, "target_new", "empty target")
    path = write(tmp_path, "ok.csv", "subject,prompt,target_new\nX,{} is,a\nY,{} is,b\nZ,{} is,c\n")
    assert [f.subject for f in load_manifest(path, limit=2).facts] == ["X", "Y"]
    assert load_manifest(path, limit=0).facts == []
    with pytest.raises(UserError):
        load_manifest(path, limit=-1)


def test_accepts_pathlike_and_str(tmp_path):
    path = write_yaml_records(tmp_path, [rec()])
    assert load_manifest(str(path)).facts == load_manifest(path).facts
    assert load_manifest(path).path == str(path)


# ---------------------------------------------------------------------------------------
# Hash and serialisation


def test_hash_depends_only_on_the_edit(tmp_path):
    base = Fact(id="1", subject="X", prompt="{} is in", target_new="Rome")
    other = Fact(
        id="zzz",
        subject="X",
        prompt="{} is in",
        target_new="Rome",
        target_true="Paris",
        paraphrases=("X lies in",),
        neighborhood=(Neighbor("Y is in", "Berlin"),),
        source="elsewhere:9",
    )
    assert base.hash == other.hash
    assert base.hash.startswith("sha256:") and len(base.hash) == len("sha256:") + 64
    assert Fact(id="1", subject="X", prompt="{} is in", target_new="Milan").hash != base.hash
    assert Fact(id="1", subject="Y", prompt="{} is in", target_new="Rome").hash != base.hash
    assert Fact(id="1", subject="X", prompt="{} lies in", target_new="Rome").hash != base.hash


def test_hash_is_the_same_across_formats(tmp_path):
    csv_path = write(tmp_path, "m.csv", "id,subject,prompt,target_new\nq,X,X is in,Rome\n")
    yaml_path = write_yaml_records(tmp_path, [{"subject": " X ", "prompt": "{} is in ", "target_new": "Rome"}])
    assert load_manifest(csv_path).facts[0].hash == load_manifest(yaml_path).facts[0].hash


def test_hash_is_stable():
    # Journals store this value; changing the canonical form would orphan them.
    fact = Fact(id="1", subject="X", prompt="{} is in", target_new="Rome")
    assert (
        fact.hash
        == "sha256:"
        + __import__("hashlib").sha256(b'{"prompt":"{} is in","subject":"X","target_new":"Rome"}').hexdigest()
    )


def test_to_dict_round_trip(tmp_path):
    path = write(tmp_path, "m.yaml", YAML_TEXT)
    for fact in load_manifest(path).facts:
        d = fact.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert fact_from_dict(json.loads(json.dumps(d))) == fact


def test_fact_from_dict_validates():
    d = Fact(id="1", subject="X", prompt="{} is in", target_new="Rome", source="m.csv:2").to_dict()
    d["target_new"] = ""
    del d["id"]
    with pytest.raises(ManifestError) as info:
        fact_from_dict(d)
    assert any("field 'id': missing" in p for p in info.value.problems)
    assert any("m.csv:2: field 'target_new': empty target" in p for p in info.value.problems)


_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), min_size=1, max_size=20
)
_word = _text.filter(lambda s: s.strip() == s and s.strip() != "")


@settings(max_examples=60, deadline=None)
@given(
    subject=_word,
    before=_text,
    target_new=_word,
    target_true=st.none() | _word,
    paraphrases=st.lists(_word, max_size=3),
    neighbors=st.lists(st.tuples(_word, _word), max_size=3),
    fid=_word,
)
def test_round_trip_property(subject, before, target_new, target_true, paraphrases, neighbors, fid):
    if target_true == target_new:
        target_true = None
    record = {
        "id": fid,
        "subject": subject,
        "prompt": before + " {} is",
        "target_new": target_new,
        "target_true": target_true,
        "paraphrases": paraphrases,
        "neighborhood": [{"prompt": p, "answer": a} for p, a in neighbors],
        "source": "gen:1",
    }
    fact = fact_from_dict(record)
    assert fact_from_dict(fact.to_dict()) == fact
    assert fact_from_dict(json.loads(json.dumps(fact.to_dict()))).hash == fact.hash


# ---------------------------------------------------------------------------------------
# Speed and import weight


def test_5000_csv_rows_load_quickly(tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "id",
                "subject",
                "prompt",
                "target_new",
                "target_true",
                "paraphrases",
                "neighborhood_prompts",
                "neighborhood_answers",
            ]
        )
        for i in range(5000):
            writer.writerow(
                [
                    f"f{i}",
                    f"Subject {i}",
                    "The capital of {} is",
                    f"City {i}",
                    f"Town {i}",
                    "Where is {}?|{} lies in",
                    "A is in|B is in",
                    "X|Y",
                ]
            )
    start = time.perf_counter()
    m = load_manifest(path)
    elapsed = time.perf_counter() - start
    assert len(m.facts) == 5000
    assert elapsed < 2.0, f"5,000 rows took {elapsed:.2f} s"


def test_manifest_does_not_import_heavy_libraries():
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, romebatch.manifest\n"
        "heavy = [m for m in ('torch', 'transformers', 'polars', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
