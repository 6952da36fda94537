"""Fuzzing the converter, --set and the validator with mutations of the shipped workflows (editor and API format):
whatever the file and the --set texts say, the result is a prompt or a WorkflowError, never another exception, and a
prompt that validates links only to outputs that exist (the runner takes those for granted)."""
import argparse
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
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

# Values the crashes were found with, and their neighbours: links to missing nodes and slots, wrapped links,
# non-finite numbers, wrong containers.
SPECIAL = [["99", 0], ["6", 3], ["6", -1], [6, 0], ["6"], {"__value__": ["99", 0]}, {"__value__": ["6", 3]},
           {"__value__": 5}, float("nan"), float("inf"), 2**64, -1, 0, "", "NaN", "true", None, [], {}, [1, 2],
           {"title": 5}, ["My Sampler"]]  # fmt: skip
SET_VALUES = ["NaN", "inf", "-inf", "true", "False", "off", "yes", "2", "2.7", "-1", "0", "1e400", "99999999999999999999",
              '["99",0]', '["6",3]', '{"__value__": ["6", 3]}', "null", "{}", "[]", "", "euler", "simple", "a cat",
              "\x00", "../x", "flux1-dev.safetensors"]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.sampled_from(SPECIAL),
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


def _assignments(data, original: dict) -> list[str]:
    """--set texts naming the nodes of the (unmutated) workflow by id and title, or anything else."""
    nodes = original.get("nodes") or [{"id": i, "title": n["_meta"]["title"]} for i, n in original.items()]
    refs = [str(n["id"]) for n in nodes] + [n["title"] for n in nodes if "title" in n] + ["Flux Sampler (FluxKit)"]
    names = ["seed", "steps", "guidance", "max_shift", "tiled", "width", "model", "unet_name", "filename_prefix", "text", "x"]
    ref = st.sampled_from(refs) | st.text(max_size=4)
    value = st.sampled_from(SET_VALUES) | st.text(max_size=6)
    texts = st.builds(lambda r, n, v: f"{r}.{n}={v}", ref, st.sampled_from(names), value) | st.text(max_size=12)
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
    if error or node_errors:
        return
    for node in prompt.values():  # what run_prompt relies on: every link reaches an output that exists
        for value in node["inputs"].values():
            if workflow.is_link(value):
                assert 0 <= value[1] < len(defs.get(prompt[value[0]]["class_type"]).outputs), value


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_mutated_workflows_give_a_prompt_or_a_workflow_error(pack, path):
    original = json.loads(path.read_text())

    @FUZZ
    @given(st.data())
    def fuzz(data):
        doc = json.loads(json.dumps(original))
        _mutate(doc, data)
        _check(pack, doc, _assignments(data, original))

    fuzz()


@FUZZ
@given(st.data())
def test_set_texts_give_a_prompt_or_a_workflow_error(pack, data):
    path = data.draw(st.sampled_from(SHIPPED), "workflow")
    doc = json.loads(path.read_text())
    _check(pack, doc, _assignments(data, doc))
