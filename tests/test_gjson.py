"""GJSON subset: the examples of GJSON's README/SYNTAX.md and KServe's documented graph conditions."""

import json

import pytest

from thaw.eventing.gjson import MISSING, exists, exists_in_bytes, get

# The document GJSON's README uses for its examples.
DOC = json.loads("""{
  "name": {"first": "Tom", "last": "Anderson"},
  "age":37,
  "children": ["Sara","Alex","Jack"],
  "fav.movie": "Deer Hunter",
  "friends": [
    {"first": "Dale", "last": "Murphy", "age": 44, "nets": ["ig", "fb", "tw"]},
    {"first": "Roger", "last": "Craig", "age": 68, "nets": ["fb", "tw"]},
    {"first": "Jane", "last": "Murphy", "age": 47, "nets": ["ig", "tw"]}
  ]
}""")


@pytest.mark.parametrize(
    "path, expected",
    [
        ("name.last", "Anderson"),
        ("age", 37),
        ("children", ["Sara", "Alex", "Jack"]),
        ("children.#", 3),
        ("children.1", "Alex"),
        ("child*.2", "Jack"),
        ("c?ildren.0", "Sara"),
        ("fav\\.movie", "Deer Hunter"),
        ("friends.#.first", ["Dale", "Roger", "Jane"]),
        ("friends.1.last", "Craig"),
        ('friends.#(last=="Murphy").first', "Dale"),
        ('friends.#(last=="Murphy")#.first', ["Dale", "Jane"]),
        ("friends.#(age>45)#.last", ["Craig", "Murphy"]),
        ('friends.#(first%"D*").last', "Murphy"),
        ('friends.#(first!%"D*").last', "Craig"),
        ('friends.#(nets.#(=="fb"))#.first', ["Dale", "Roger"]),
        ("children|@reverse", ["Jack", "Alex", "Sara"]),
        ("children|@reverse|0", "Jack"),
        ("name|@keys", ["first", "last"]),
        ("name|@values", ["Tom", "Anderson"]),
        ("{name.first,age,\"the_murphys\":friends.#(last==\"Murphy\")#.first}",
         {"first": "Tom", "age": 37, "the_murphys": ["Dale", "Jane"]}),
        ("[name.first,age,children.0]", ["Tom", 37, "Sara"]),
        ("friends.#(age>=47)#|#", 2),
        ("friends.#(age<45).first", "Dale"),
        ("friends.#(age<=44).first", "Dale"),
        ('friends.#(last!="Murphy").first', "Roger"),
    ],
)
def test_documented_gjson_examples(path, expected):
    assert get(DOC, path) == expected


@pytest.mark.parametrize(
    "path",
    ["name.middle", "children.9", 'friends.#(last=="Nobody")', "age.0", "name.#", 'friends.#(age>99).first'],
)
def test_paths_that_select_nothing(path):
    assert get(DOC, path) is MISSING
    assert not exists(DOC, path)


def test_all_matches_query_exists_even_when_empty_as_in_go():
    assert get(DOC, 'friends.#(last=="Nobody")#') == []
    assert exists(DOC, 'friends.#(last=="Nobody")#')


def test_json_null_exists():
    assert exists({"a": None}, "a")


@pytest.mark.parametrize(
    "body, condition, expected",
    [
        # KServe's documented conditions.
        ({"predictions": [{"label": "dog", "score": [0.8, 0.2]}]}, 'predictions.#(label=="dog")', True),
        ({"predictions": [{"label": "cat", "score": [0.1, 0.9]}]}, 'predictions.#(label=="dog")', False),
        ({"decision_picker": "ERROR"}, "[@this].#(decision_picker==ERROR)", True),
        ({"decision_picker": "OK"}, "[@this].#(decision_picker==ERROR)", False),
        ({"instances": [{"modelId": "1"}]}, 'instances.#(modelId=="1")', True),
        ({"instances": [{"modelId": "2"}]}, 'instances.#(modelId=="1")', False),
        ({"flag": True}, "[@this].#(flag==true)", True),
        ({"flag": False}, "[@this].#(flag==true)", False),
    ],
)
def test_kserve_conditions(body, condition, expected):
    assert exists_in_bytes(json.dumps(body).encode(), condition) is expected


def test_invalid_json_matches_nothing():
    assert not exists_in_bytes(b"not json", "@this")
