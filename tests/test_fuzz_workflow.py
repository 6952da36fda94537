"""Fuzzing the converter, --set and the validator with mutations of the shipped workflows (editor and API format):
whatever the file and the --set texts say, the result is a prompt or a WorkflowError, never another exception, and
the nodes that pass validation link only to outputs that exist (the runner takes those for granted)."""
import argparse
import copy
import importlib
import json
import runpy
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO

SHIPPED = sorted((REPO / "workflows").glob("*.json")) + sorted((REPO / "workflows" / "api").glob("*.json"))
# About 20 s in all on one core; derandomized, so that CI runs the same cases each time.
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

# Values the crashes were found with, and their neighbours: links to missing nodes and slots, wrapped links,
# non-finite numbers, wrong containers.
SPECIAL = [["99", 0], ["6", 3], ["6", -1], [6, 0], ["6"], {"__value__": ["99", 0]}, {"__value__": ["6", 3]},
           {"__value__": 5}, float("nan"), float("inf"), 2**64, -1, 0, "", "NaN", "true", None, [], {}, [1, 2],
           {"title": 5}, ["My Sampler"]]  # fmt: skip
SET_VALUES = ["NaN", "inf", "-inf", "true", "False", "off", "yes", "2", "2.7", "-1", "0", "1e400", "99999999999999999999",
              "null", "{}", "[]", "", "euler", "simple", "a cat", "\x00", "../x", "flux1-dev.safetensors"]  # fmt: skip
LINKS = ['["99",0]', '["6",3]', '["1",0]', '{"__value__": ["6", 3]}', '{"__value__": 1}']

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.sampled_from(SPECIAL).map(copy.deepcopy),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def pack():
    pack = runpy.run_path(str(REPO / "__main__.py"))["load_pack"]()
    modules = {m: importlib.import_module(f"{pack.__name__}.nodes.{m}") for m in ("workflow", "runner", "standins")}
    defs = modules["workflow"].NodeDefs({**modules["standins"].NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS},
                                        {**modules["standins"].NODE_DISPLAY_NAME_MAPPINGS, **pack.NODE_DISPLAY_NAME_MAPPINGS})  # fmt: skip
    return modules, defs


def _places(doc) -> list:
    """(container, key) of every value inside the document, depth first."""
    places, stack = [], [doc]
    while stack:
        container = stack.pop()
        keys = list(container) if isinstance(container, dict) else range(len(container))
        for key in keys:
            places.append((container, key))
            if isinstance(container[key], (dict, list)):
                stack.append(container[key])
    return places


def _mutate(doc, data) -> None:
    for _ in range(data.draw(st.integers(1, 4), "mutations")):
        places = _places(doc)
        if not places:
            return
        container, key = places[data.draw(st.integers(0, len(places) - 1), "place")]
        action = data.draw(st.sampled_from(["replace", "delete", "copy", "rename"]), "action")
        if action == "replace":
            container[key] = data.draw(json_values, "value")
        elif action == "delete":
            del container[key]
        elif action == "copy":  # a value moved where another was: right shape, wrong place
            other, other_key = places[data.draw(st.integers(0, len(places) - 1), "source")]
            container[key] = json.loads(json.dumps(other[other_key]))
        elif isinstance(container, dict):
            container[data.draw(st.sampled_from(["inputs", "_meta", "class_type", "type", "link", "6", ""]), "key")] = container.pop(key)


def _assignments(data, original: dict, defs) -> list[str]:
    """--set texts aimed at the inputs of the (unmutated) workflow's nodes, by node id or title; or anything."""
    nodes = [(str(n["id"]), n.get("title"), n["type"]) for n in original.get("nodes", [])]
    nodes = nodes or [(i, n["_meta"]["title"], n["class_type"]) for i, n in original.items()]
    targets = [f"{ref}.{name}" for node_id, title, kind in nodes for ref in (node_id, title) if ref
               for name in (defs.get(kind).inputs if defs.get(kind) else ["nope"])]  # fmt: skip
    value = st.one_of(st.sampled_from(SET_VALUES), st.sampled_from(LINKS), st.text(max_size=6))
    texts = st.builds(lambda target, v: f"{target}={v}", st.sampled_from(targets), value) | st.text(max_size=12)
    return data.draw(st.lists(texts, max_size=3), "--set")


def _check(pack, doc, assignments) -> None:
    modules, defs = pack
    workflow = modules["workflow"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "workflow.json"
        path.write_text(json.dumps(doc))
        try:
            prompt, _ = modules["runner"]._prepare(argparse.Namespace(workflow=path, set=assignments), defs)
            error, node_errors = workflow.validate(prompt, defs)
        except workflow.WorkflowError:
            return
    for node_id, node in prompt.items():  # what run_prompt relies on: the links of a valid node reach real outputs
        if node_id in node_errors:
            continue
        for value in node["inputs"].values():
            if workflow.is_link(value):
                source = defs.get(prompt[value[0]]["class_type"])
                assert source is None or 0 <= value[1] < len(source.outputs), (node_id, value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_mutated_workflows_give_a_prompt_or_a_workflow_error(pack, path):
    original = json.loads(path.read_text())

    @FUZZ
    @given(st.data())
    def fuzz(data):
        doc = json.loads(json.dumps(original))
        _mutate(doc, data)
        _check(pack, doc, _assignments(data, original, pack[1]))

    fuzz()


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_set_texts_give_a_prompt_or_a_workflow_error(pack, data):
    path = data.draw(st.sampled_from(SHIPPED), "workflow")
    doc = json.loads(path.read_text())
    _check(pack, doc, _assignments(data, doc, pack[1]))
