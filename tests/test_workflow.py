"""UI -> API conversion, --set, validation and JSON limits, with small fake node classes (the pack's own workflows
are tested elsewhere). test_runner.py and test_remote.py reuse the fakes and the module loader from here."""
import copy
import importlib
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_PKG = "fluxkit_headless_under_test"


def load(module: str):
    """One of our nodes/ modules, in a package that skips nodes/__init__.py (the pack's nodes are not needed)."""
    if _PKG not in sys.modules:
        package = types.ModuleType(_PKG)
        package.__path__ = [str(REPO / "nodes")]
        sys.modules[_PKG] = package
    return importlib.import_module(f"{_PKG}.{module}")


workflow = load("workflow")
standins = load("standins")


class Loader:
    RETURN_TYPES, FUNCTION = ("MODEL",), "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (["a.bin", "b.bin"],)}}

    def load(self, name):
        return ({"name": name},)


class Patch:
    RETURN_TYPES, FUNCTION = ("MODEL",), "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0})}}

    def patch(self, model, strength):
        return ({**model, "strength": strength},)


class Text:
    RETURN_TYPES, FUNCTION = ("STRING",), "text"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {"default": ""})}}

    def text(self, value):
        return (value,)


class Number:
    RETURN_TYPES, FUNCTION = ("FLOAT",), "number"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 0.0})}}

    def number(self, value):
        return (value,)


class Encode:
    RETURN_TYPES, FUNCTION = ("COND",), "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "text": ("STRING", {"multiline": True})}}

    def encode(self, model, text):
        return ((model["name"], text),)


class Sampler:
    RETURN_TYPES, FUNCTION = ("LATENT",), "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "cond": ("COND",),
                "latent": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 100}),
                "mode": (["euler", "heun"],),
            },
            "optional": {"cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0}), "shift": ("FLOAT", {"forceInput": True})},
        }

    def sample(self, model, cond, latent, seed, steps, mode, cfg=1.0, shift=None):
        # The decoded image shows seed % 256 as its grey level, so tests can see which seed ran.
        return ({"samples": latent["samples"], "grey": seed % 256, "args": (model, cond, steps, mode, cfg, shift)},)


class Decode:
    RETURN_TYPES, FUNCTION = ("IMAGE",), "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def decode(self, samples):
        b, _, h, w = samples["samples"].shape
        return (torch.full((b, h * 8, w * 8, 3), samples["grey"] / 255.0),)


FAKE_NODES = {c.__name__: c for c in (Loader, Patch, Text, Number, Encode, Sampler, Decode)}


def defs(extra: dict | None = None):
    names = {**standins.NODE_DISPLAY_NAME_MAPPINGS, "Sampler": "Fake Sampler"}
    return workflow.NodeDefs({**standins.NODE_CLASS_MAPPINGS, **FAKE_NODES, **(extra or {})}, names)


def ui_node(id, type, inputs=(), outputs=(), widgets=None, mode=0, **extra):
    """A node as the editor saves it; inputs/outputs as (name, type, link or links)."""
    node = {"id": id, "type": type, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": id, "mode": mode,
            "inputs": [{"name": n, "type": t, "link": l} for n, t, l in inputs],
            "outputs": [{"name": t, "type": t, "links": ls, "slot_index": i} for i, (t, ls) in enumerate(outputs)],
            "properties": {"Node name for S&R": type}, **extra}  # fmt: skip
    if widgets is not None:
        node["widgets_values"] = widgets
    return node


def sample_ui() -> dict:
    """A graph with every conversion rule: seed control value, Reroute, Primitive, Note, muted and bypassed nodes,
    a converted widget fed by a link, a forceInput socket, defaults for missing widget values."""
    nodes = [
        ui_node(1, "Loader", outputs=[("MODEL", [1])], widgets=["b.bin"]),
        ui_node(2, "Patch", [("model", "MODEL", 1)], [("MODEL", [2])], widgets=[0.5], mode=4),  # bypassed
        ui_node(3, "Reroute", [("", "*", 2)], [("MODEL", [3, 4])]),
        ui_node(4, "Encode", [("model", "MODEL", 3), ("text", "STRING", 13)], [("COND", [5])], widgets=["overridden"]),
        ui_node(5, "PrimitiveNode", outputs=[("INT", [6])], widgets=[12, "fixed"]),
        ui_node(6, "EmptySD3LatentImage", outputs=[("LATENT", [7])], widgets=[512, 256]),  # batch_size from default
        ui_node(7, "Sampler", [("model", "MODEL", 4), ("cond", "COND", 5), ("latent", "LATENT", 7),
                               ("steps", "INT", 6), ("shift", "FLOAT", 8)], [("LATENT", [9])],
                widgets=[42, "randomize", 99, "heun", 2.5], title="My Sampler"),  # fmt: skip
        ui_node(8, "Number", outputs=[("FLOAT", [8])], widgets=[3.0]),
        ui_node(9, "Decode", [("samples", "LATENT", 9)], [("IMAGE", [10, 11])]),
        ui_node(10, "SaveImage", [("images", "IMAGE", 10)], widgets=["flux/test"]),
        ui_node(11, "Note", widgets=["remember the milk"]),
        ui_node(12, "SaveImage", [("images", "IMAGE", 11)], widgets=["muted"], mode=2),  # muted
        ui_node(13, "Loader", outputs=[("MODEL", [12])], widgets=["a.bin"], mode=2),  # muted, feeds node 14
        ui_node(14, "Encode", [("model", "MODEL", 12)], [("COND", [])], widgets=["orphan"]),
        ui_node(15, "Text", outputs=[("STRING", [13])], widgets=["a cat"]),
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 0, "MODEL"], [4, 3, 0, 7, 0, "MODEL"],
             [5, 4, 0, 7, 1, "COND"], [6, 5, 0, 7, 3, "INT"], [7, 6, 0, 7, 2, "LATENT"], [8, 8, 0, 7, 4, "FLOAT"],
             [9, 7, 0, 9, 0, "LATENT"], [10, 9, 0, 10, 0, "IMAGE"], [11, 9, 0, 12, 0, "IMAGE"],
             [12, 13, 0, 14, 0, "MODEL"], [13, 15, 0, 4, 1, "STRING"]]  # fmt: skip
    return {"last_node_id": 15, "last_link_id": 13, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}  # fmt: skip


SAMPLE_API = {
    "1": {"inputs": {"name": "b.bin"}, "class_type": "Loader", "_meta": {"title": "Loader"}},
    "4": {"inputs": {"text": ["15", 0], "model": ["1", 0]}, "class_type": "Encode", "_meta": {"title": "Encode"}},
    "6": {"inputs": {"width": 512, "height": 256, "batch_size": 1}, "class_type": "EmptySD3LatentImage",
          "_meta": {"title": "EmptySD3LatentImage"}},
    "7": {"inputs": {"seed": 42, "steps": 12, "mode": "heun", "cfg": 2.5, "model": ["1", 0], "cond": ["4", 0],
                     "latent": ["6", 0], "shift": ["8", 0]}, "class_type": "Sampler", "_meta": {"title": "My Sampler"}},
    "8": {"inputs": {"value": 3.0}, "class_type": "Number", "_meta": {"title": "Number"}},
    "9": {"inputs": {"samples": ["7", 0]}, "class_type": "Decode", "_meta": {"title": "Decode"}},
    "10": {"inputs": {"filename_prefix": "flux/test", "images": ["9", 0]}, "class_type": "SaveImage",
           "_meta": {"title": "Save Image"}},
    "14": {"inputs": {"text": "orphan"}, "class_type": "Encode", "_meta": {"title": "Encode"}},
    "15": {"inputs": {"value": "a cat"}, "class_type": "Text", "_meta": {"title": "Text"}},
}  # fmt: skip


def test_ui_to_api_follows_the_editor():
    assert workflow.to_api(sample_ui(), defs()) == SAMPLE_API


def test_schema_1_object_links_convert_the_same():
    ui = sample_ui()
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    ui["links"] = [dict(zip(keys, link)) for link in ui["links"]]
    ui["version"] = 1
    assert workflow.to_api(ui, defs()) == SAMPLE_API


def test_bypass_picks_the_input_of_the_wanted_type():
    # A bypassed Patch whose first input is not a MODEL: the MODEL input passes through, wherever it sits.
    ui = sample_ui()
    patch = ui["nodes"][1]
    patch["inputs"] = [{"name": "other", "type": "LATENT", "link": None}, *patch["inputs"]]
    assert workflow.to_api(ui, defs())["7"]["inputs"]["model"] == ["1", 0]
    patch["inputs"][1]["link"] = None  # nothing to pass through: the input vanishes and validation will say so
    assert "model" not in workflow.to_api(ui, defs())["7"]["inputs"]


def test_widget_values_by_name_and_list_values():
    class Lists:
        RETURN_TYPES, FUNCTION = (), "f"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"points": ("STRING",), "noise_seed": ("INT", {}), "after": ("INT", {"control_after_generate": True}), "last": ("BOOLEAN", {"default": True})}}

    d = defs({"Lists": Lists})
    node = ui_node(1, "Lists", widgets=[[1, 2], 7, "fixed", 8, "increment"])
    api = workflow.to_api({"nodes": [node], "links": []}, d)
    assert api["1"]["inputs"] == {"points": {"__value__": [1, 2]}, "noise_seed": 7, "after": 8, "last": True}
    node["widgets_values"] = {"after": 5, "points": "x"}
    assert workflow.to_api({"nodes": [node], "links": []}, d)["1"]["inputs"] == {"points": "x", "noise_seed": 0, "after": 5, "last": True}


def test_broken_links_and_malformed_nodes_are_reported():
    ui = sample_ui()
    ui["links"] = [link for link in ui["links"] if link[0] != 5]
    with pytest.raises(workflow.WorkflowError, match="link 5"):
        workflow.to_api(ui, defs())
    ui = sample_ui()
    ui["nodes"][3]["inputs"] = [{"link": 3}]
    with pytest.raises(workflow.WorkflowError, match="malformed editor workflow"):
        workflow.to_api(ui, defs())


def test_set_by_id_and_title_updates_prompt_and_ui():
    ui = sample_ui()
    api = workflow.to_api(ui, defs())
    workflow.set_inputs(api, ["7.seed=7", "My Sampler.mode=euler", "15.value=42", "6.width=1024", "7.cfg=3"], defs(), ui)
    assert api["7"]["inputs"]["seed"] == 7 and api["7"]["inputs"]["mode"] == "euler" and api["7"]["inputs"]["cfg"] == 3
    assert api["15"]["inputs"]["value"] == "42"  # a STRING input keeps the text as typed
    assert api["6"]["inputs"]["width"] == 1024
    sampler = next(n for n in ui["nodes"] if n["id"] == 7)
    assert sampler["widgets_values"] == [7, "randomize", 99, "euler", 3]
    assert workflow.to_api(ui, defs())["7"]["inputs"]["seed"] == 7  # the saved workflow reproduces the run
    workflow.set_inputs(api, ["4.text=a dog"], defs())  # a constant replaces a link
    assert api["4"]["inputs"]["text"] == "a dog"


@pytest.mark.parametrize("assignment, message", [
    ("7.sead=1", "has no input 'sead'; its inputs: model, cond"),
    ("99.seed=1", "no node with id or title '99'"),
    ("Encode.text=x", "names nodes 4, 14; use the node id"),
    ("seed=1", "expected NODE.INPUT=VALUE"),
])  # fmt: skip
def test_set_errors_name_the_fix(assignment, message):
    api = workflow.to_api(sample_ui(), defs())
    with pytest.raises(workflow.WorkflowError, match=message):
        workflow.set_inputs(api, [assignment], defs())


def api_prompt() -> dict:
    return copy.deepcopy({k: v for k, v in SAMPLE_API.items() if k != "14"})


def errors_of(prompt, d=None):
    error, node_errors = workflow.validate(prompt, d or defs())
    return error, {(i, e["class_type"], x["type"], (x["extra_info"] or {}).get("input_name")) for i, e in node_errors.items() for x in e["errors"]}


def test_valid_prompt_passes_and_is_normalised():
    prompt = api_prompt()
    prompt["7"]["inputs"]["seed"] = "5"
    assert workflow.validate(prompt, defs()) == (None, {})
    assert prompt["7"]["inputs"]["seed"] == 5


def test_each_validation_error_is_reported_like_comfyui():
    prompt = api_prompt()
    prompt["20"] = {"class_type": "NoSuchNode", "inputs": {}}
    del prompt["4"]["inputs"]["text"]  # required input missing
    prompt["9"]["inputs"]["samples"] = ["4", 0]  # COND into a LATENT input
    prompt["7"]["inputs"]["steps"] = 0  # below min
    prompt["7"]["inputs"]["cfg"] = 31  # above max
    prompt["7"]["inputs"]["mode"] = "dpm"  # not in the list
    prompt["8"]["inputs"]["value"] = "abc"  # not a float
    prompt["10"]["inputs"]["images"] = ["77", 0]  # no such node
    error, found = errors_of(prompt)
    assert error["type"] == "prompt_outputs_failed_validation"
    assert found == {
        ("20", "NoSuchNode", "invalid_prompt", None),
        ("4", "Encode", "required_input_missing", "text"),
        ("9", "Decode", "return_type_mismatch", "samples"),
        ("7", "Sampler", "value_smaller_than_min", "steps"),
        ("7", "Sampler", "value_bigger_than_max", "cfg"),
        ("7", "Sampler", "value_not_in_list", "mode"),
        ("8", "Number", "invalid_input_type", "value"),
        ("10", "SaveImage", "bad_linked_input", "images"),
    }
    lines = workflow.format_errors(*workflow.validate(prompt, defs()))
    assert "node 7 (Sampler) input 'steps': Value 0 smaller than min of 1" in lines
    assert "node 7 (Sampler) input 'mode': Value not in list [mode: 'dpm' not in ['euler', 'heun']]" in lines
    assert any(line.startswith("node 20 (NoSuchNode): Node class 'NoSuchNode' does not exist") for line in lines)


def test_cycle_is_reported_on_its_nodes_only():
    prompt = api_prompt()
    prompt["1"] = {"class_type": "Patch", "inputs": {"model": ["2", 0], "strength": 1.0}}
    prompt["2"] = {"class_type": "Patch", "inputs": {"model": ["1", 0], "strength": 1.0}}
    prompt["4"]["inputs"]["model"] = prompt["7"]["inputs"]["model"] = ["2", 0]
    error, found = errors_of(prompt)
    assert found == {("1", "Patch", "dependency_cycle", "model"), ("2", "Patch", "dependency_cycle", "model")}


def test_no_output_node_is_an_error():
    error, found = errors_of({"1": {"class_type": "Loader", "inputs": {"name": "a.bin"}}})
    assert error["type"] == "prompt_no_outputs" and not found


def test_validate_inputs_takes_over_its_inputs():
    class Checked(Loader):
        @classmethod
        def VALIDATE_INPUTS(cls, name):
            return True if name.endswith(".bin") else f"{name} is not a .bin file"

    prompt = {"1": {"class_type": "Checked", "inputs": {"name": "c.bin"}}, "2": {"class_type": "SaveImage", "inputs": {}}}
    d = defs({"Checked": Checked})
    assert ("1", "Checked", "value_not_in_list", "name") not in errors_of(prompt, d)[1]  # the list check is its own
    prompt["1"]["inputs"]["name"] = "c.txt"
    _, node_errors = workflow.validate(prompt, d)
    assert node_errors["1"]["errors"][0]["type"] == "custom_validation_failed"
    assert "c.txt is not a .bin file" in node_errors["1"]["errors"][0]["details"]


def test_object_info_definitions_convert_like_the_classes():
    d = defs()
    info = {name: {"input": c.INPUT_TYPES(), "output": list(c.RETURN_TYPES), "output_node": getattr(c, "OUTPUT_NODE", False),
                   "display_name": d.display_name(name)} for name, c in d.classes.items()}  # fmt: skip
    remote_defs = workflow.NodeDefs.from_object_info(json.loads(json.dumps(info)))  # tuples become lists, as served
    assert workflow.to_api(sample_ui(), remote_defs) == SAMPLE_API


def test_oversized_deep_and_foreign_json_are_refused(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (workflow.MAX_JSON_BYTES + 1) + b"{}")
    with pytest.raises(workflow.WorkflowError, match="limit is 10 MiB"):
        workflow.read_workflow(big)
    for depth in (workflow.MAX_DEPTH + 1, 100_000):  # the second would exhaust the parser's recursion
        deep = tmp_path / "deep.json"
        deep.write_text('{"nodes": [], "x": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(workflow.WorkflowError, match="nested more than 64 levels"):
            workflow.read_workflow(deep)
    other = tmp_path / "other.json"
    other.write_text('{"hello": "world"}')
    with pytest.raises(workflow.WorkflowError, match="not a ComfyUI workflow"):
        workflow.read_workflow(other)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(sample_ui()))
    assert workflow.read_workflow(ok) == sample_ui()


def test_set_parses_by_the_declared_type():
    class Flags:
        RETURN_TYPES, FUNCTION = (), "f"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"tiled": ("BOOLEAN", {"default": True}), "size": ("INT", {"default": 8}),
                                 "scale": ("FLOAT", {"default": 1.0}), "mode": (["on", "off"],)}}  # fmt: skip

    d = defs({"Flags": Flags})
    prompt = {"1": {"class_type": "Flags", "inputs": {}}}
    words = {"False": False, "false": False, "NO": False, "off": False, "0": False, "true": True, "Yes": True, "ON": True, "1": True}
    for word, value in words.items():
        workflow.set_inputs(prompt, [f"1.tiled={word}"], d)
        assert prompt["1"]["inputs"]["tiled"] is value, word
    workflow.set_inputs(prompt, ["1.size=-3", "1.scale=2", "1.mode=off"], d)
    assert prompt["1"]["inputs"] == {"tiled": True, "size": -3, "scale": 2.0, "mode": "off"}
    for assignment, expected in [("1.tiled=maybe", "expected true/false"), ("1.tiled=2", "expected true/false"),
                                 ("1.size=2.7", "expected a whole number"), ("1.size=true", "expected a whole number"),
                                 ("1.scale=true", "expected a number"), ("1.scale=", "expected a number")]:  # fmt: skip
        with pytest.raises(workflow.WorkflowError, match=f"--set '{re.escape(assignment)}': '.*' is of type [A-Z]+; {expected}"):
            workflow.set_inputs(prompt, [assignment], d)
    assert prompt["1"]["inputs"] == {"tiled": True, "size": -3, "scale": 2.0, "mode": "off"}  # refusals change nothing


def test_a_boolean_given_as_text_is_refused_not_taken_as_true():
    class Switch:
        RETURN_TYPES, FUNCTION, OUTPUT_NODE = (), "f", True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"on": ("BOOLEAN", {"default": True})}}

    _, found = errors_of({"1": {"class_type": "Switch", "inputs": {"on": "false"}}}, defs({"Switch": Switch}))
    assert found == {("1", "Switch", "invalid_input_type", "on")}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "NaN", "inf"])
def test_non_finite_numbers_are_refused(value):
    prompt = api_prompt()
    prompt["7"]["inputs"]["cfg"] = value  # within [0, 30] by every comparison NaN makes
    prompt["8"]["inputs"]["value"] = value  # a FLOAT without a range
    error, found = errors_of(prompt)
    assert found == {("7", "Sampler", "value_not_finite", "cfg"), ("8", "Number", "value_not_finite", "value")}
    lines = workflow.format_errors(*workflow.validate(prompt, defs()))
    assert any(line.startswith("node 8 (Number) input 'value': Value") and "is not a finite number" in line for line in lines)


def test_set_nan_is_refused_by_validation():
    prompt = api_prompt()
    workflow.set_inputs(prompt, ["7.cfg=NaN", "8.value=-inf"], defs())
    _, found = errors_of(prompt)
    assert found == {("7", "Sampler", "value_not_finite", "cfg"), ("8", "Number", "value_not_finite", "value")}


def test_fuzzer_crash_sites_are_workflow_errors():
    prompt = api_prompt()
    prompt["7"]["_meta"] = ["not", "an", "object"]  # was AttributeError
    with pytest.raises(workflow.WorkflowError, match="no node with id or title 'My Sampler'"):
        workflow.set_inputs(prompt, ["My Sampler.seed=3"], defs())
    workflow.set_inputs(prompt, ["Number.value=3"], defs())  # titles of the other nodes still work
    prompt["7"]["inputs"] = None  # was TypeError
    with pytest.raises(workflow.WorkflowError, match="node 7's inputs are not an object"):
        workflow.set_inputs(prompt, ["7.seed=3"], defs())
    with pytest.raises(workflow.WorkflowError, match="'model' is a MODEL input, fed by a link"):  # was KeyError at run
        workflow.set_inputs(api_prompt(), ['7.model=["99",0]'], defs())


@pytest.mark.parametrize("value", [{"__value__": ["99", 0]}, {"__value__": ["8", 3]}, "b.bin"])
def test_constants_cannot_feed_link_inputs(value):
    prompt = api_prompt()
    prompt["7"]["inputs"]["model"] = value  # was KeyError / IndexError at run time, taken for a link
    _, found = errors_of(prompt)
    assert found == {("7", "Sampler", "invalid_input_type", "model")}


def test_array_constants_stay_constants_after_validation():
    class Anything:
        RETURN_TYPES, FUNCTION, OUTPUT_NODE = (), "f", True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("*",), "text": ("STRING", {})}}

    prompt = {"1": {"class_type": "Anything", "inputs": {"x": {"__value__": ["8", 3]}, "text": {"__value__": ["8", 0]}}}}
    assert workflow.validate(prompt, defs({"Anything": Anything})) == (None, {})
    assert prompt["1"]["inputs"] == {"x": {"__value__": ["8", 3]}, "text": "['8', 0]"}  # never a bare list: a link
    assert not workflow.is_link(prompt["1"]["inputs"]["x"]) and workflow.unwrap(prompt["1"]["inputs"]["x"]) == ["8", 3]


def test_subgraphs_and_group_nodes_are_named_as_unsupported():
    ui = sample_ui()
    ui["definitions"] = {"subgraphs": [{"id": "5f1c0a7e-0000-4000-8000-000000000001", "name": "Upscale", "nodes": [], "links": []}]}
    ui["nodes"].append(ui_node(16, "5f1c0a7e-0000-4000-8000-000000000001", [("images", "IMAGE", None)]))
    with pytest.raises(workflow.WorkflowError, match="node 16 is the subgraph 'Upscale': the headless runner does not support subgraphs yet"):
        workflow.to_api(ui, defs())
    ui["nodes"][-1]["mode"] = 2  # muted: it is not sent, so it does not matter
    assert workflow.to_api(ui, defs()) == SAMPLE_API
    ui = sample_ui()
    ui["extra"]["groupNodes"] = {"Sampling": {"nodes": [], "links": []}}
    ui["nodes"].append(ui_node(16, "workflow>Sampling"))
    with pytest.raises(workflow.WorkflowError, match="node 16 is the group node 'workflow>Sampling'.*Convert to nodes"):
        workflow.to_api(ui, defs())
