"""ComfyUI workflow JSON without ComfyUI: reading it safely, editor (UI) format -> API format, --set overrides,
and the graph validation of ComfyUI's POST /prompt.

Node definitions come from classic-contract node classes (INPUT_TYPES, RETURN_TYPES, ...) or from a server's
/object_info, so the same code converts for the headless runner and for server mode.
"""
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

MAX_JSON_BYTES = 10 * 2**20
MAX_DEPTH = 64
MUTED, BYPASSED = 2, 4  # litegraph node modes (0 always, 2 never, 4 bypass)
VIRTUAL = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}  # editor-only nodes, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
SEED_NAMES = {"seed", "noise_seed"}  # INT widgets the editor follows with a control_after_generate value
ANY = {"*", "", None}


class WorkflowError(Exception):
    """A problem with a workflow or its run, with a message meant for the user."""


class ValidationError(WorkflowError):
    """The graph failed validation: `error` (whole prompt) and `node_errors` as ComfyUI's POST /prompt answers."""

    def __init__(self, error: dict | None, node_errors: dict, headline: str = "the workflow is not valid"):
        self.error, self.node_errors = error, node_errors
        super().__init__(f"{headline}:\n  " + "\n  ".join(format_errors(error, node_errors)))


# ---------------------------------------------------------------------------------------------- reading JSON


def parse_json(data: bytes | str, what: str, limit: int = MAX_JSON_BYTES):
    """JSON text -> object, refusing oversized or deeply nested documents before they cost memory or recursion."""
    if len(data) > limit:
        raise WorkflowError(f"{what} is {len(data) / 2**20:.1f} MiB; the limit is {limit / 2**20:.0f} MiB")
    try:
        obj = json.loads(data)
    except RecursionError:
        raise WorkflowError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:
        raise WorkflowError(f"{what} is not valid JSON: {e}") from None
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise WorkflowError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return obj


def read_workflow(path) -> dict:
    """A workflow from a .json file (UI or API format) or from a PNG saved by ComfyUI (its workflow/prompt chunk)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES and path.suffix.lower() != ".png":
            raise WorkflowError(f"{path} is {size / 2**20:.1f} MiB; the limit is {MAX_JSON_BYTES / 2**20:.0f} MiB")
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as image:  # ComfyUI's text chunks precede the pixels: no decoding needed
                text = image.info.get("workflow") or image.info.get("prompt")
            if text is None:
                raise WorkflowError(f"{path} carries no ComfyUI workflow (no 'workflow' or 'prompt' text chunk)")
        else:
            text = path.read_bytes()
    except (OSError, ValueError) as e:
        raise WorkflowError(f"cannot read the workflow {path}: {getattr(e, 'strerror', None) or e}") from None
    workflow = parse_json(text, str(path))
    if not (is_ui(workflow) or is_api(workflow)):
        raise WorkflowError(
            f"{path} is not a ComfyUI workflow: expected the editor's format (nodes, links) or the API format "
            '({"<id>": {"class_type": ..., "inputs": {...}}})'
        )
    return workflow


def is_ui(workflow) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list)


def is_api(workflow) -> bool:
    return isinstance(workflow, dict) and bool(workflow) and all(
        isinstance(node, dict) and "class_type" in node for node in workflow.values()
    )


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# ---------------------------------------------------------------------------------------------- node definitions


@dataclass
class Input:
    name: str
    type: str | list  # "COMBO" for choice lists (their values are in `choices`)
    options: dict
    required: bool
    choices: list | None = None

    @property
    def is_widget(self) -> bool:
        """Inputs the editor shows as a widget (their values sit in widgets_values)."""
        return self.type in WIDGET_TYPES and not self.options.get("forceInput")

    @property
    def has_control_value(self) -> bool:
        """The editor stores a control_after_generate value ("fixed", "randomize"...) right after this widget."""
        control = self.options.get("control_after_generate")
        if self.type == "INT":
            return bool(control) if control is not None else self.name in SEED_NAMES
        return self.type == "COMBO" and bool(control)

    def default(self):
        """The editor's value for a widget missing from widgets_values."""
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            return self.choices[0] if self.choices else None
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[self.type]


@dataclass
class NodeDef:
    class_type: str
    inputs: dict[str, Input]  # required then optional, in declaration order
    hidden: dict
    outputs: tuple
    output_node: bool
    display_name: str
    cls: type | None = None  # the node class when running locally (for VALIDATE_INPUTS and execution)
    widget_slots: list = field(init=False)

    def __post_init__(self):
        # Positional layout of widgets_values: each widget's name, then None for its control value if any.
        self.widget_slots = []
        for inp in self.inputs.values():
            if inp.is_widget:
                self.widget_slots += [inp.name, None] if inp.has_control_value else [inp.name]

    @classmethod
    def from_spec(cls, class_type, input_types, outputs, output_node, display_name, node_class=None):
        inputs = {}
        for category in ("required", "optional"):
            for name, spec in (input_types.get(category) or {}).items():
                spec = spec if isinstance(spec, (list, tuple)) else (spec,)
                kind, options = spec[0], dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
                choices = list(kind) if isinstance(kind, (list, tuple)) else options.get("options") if kind == "COMBO" else None
                kind = "COMBO" if choices is not None else kind
                inputs[name] = Input(name, kind, options, category == "required", choices)
        hidden = dict(input_types.get("hidden") or {})
        return cls(class_type, inputs, hidden, tuple(outputs), bool(output_node), display_name, node_class)


class NodeDefs:
    """Definitions of the node classes a workflow uses, read once each (INPUT_TYPES may list model folders)."""

    def __init__(self, classes: dict, display_names: dict | None = None):
        self.classes, self.display_names, self._defs = dict(classes), dict(display_names or {}), {}

    @classmethod
    def from_object_info(cls, info: dict) -> "NodeDefs":
        """Definitions as a ComfyUI server describes them at GET /object_info."""
        defs = cls({})
        for name, d in info.items():
            defs._defs[name] = NodeDef.from_spec(
                name, d.get("input") or {}, d.get("output") or (), d.get("output_node"), d.get("display_name") or name
            )
        return defs

    def get(self, class_type) -> NodeDef | None:
        if not isinstance(class_type, str):
            return None
        if class_type not in self._defs and class_type in self.classes:
            c = self.classes[class_type]
            self._defs[class_type] = NodeDef.from_spec(
                class_type, c.INPUT_TYPES(), getattr(c, "RETURN_TYPES", ()), getattr(c, "OUTPUT_NODE", False),
                self.display_names.get(class_type, class_type), c,
            )
        return self._defs.get(class_type)

    def display_name(self, class_type) -> str:
        d = self.get(class_type)
        return d.display_name if d is not None else class_type


def types_match(received, expected) -> bool:
    """A link from an output of type `received` may feed an input of type `expected` ("A,B" lists, "*" any)."""
    if received in ANY or expected in ANY or received == expected:
        return True
    if expected == "COMBO" and isinstance(received, list):
        return True
    if not (isinstance(received, str) and isinstance(expected, str)):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


# ---------------------------------------------------------------------------------------------- UI -> API


def _wrap(value):
    """Array widget values travel as {"__value__": [...]}: a bare list means a link in the API format."""
    return {"__value__": value} if isinstance(value, list) else value


def unwrap(value):
    """The constant a wrapped array value stands for (other values as they are)."""
    return value["__value__"] if isinstance(value, dict) and "__value__" in value else value


def takes_constants(inp: "Input") -> bool:
    """Inputs with a widget type (or any type) take constants; the others (MODEL, LATENT...) only links."""
    kinds = {t.strip() for t in inp.type.split(",")} if isinstance(inp.type, str) else {inp.type}
    return bool(kinds & (WIDGET_TYPES | ANY))


def _links(ui: dict) -> dict:
    """link id -> (origin_id, origin_slot, target_id, target_slot, type), from version 0.4 arrays or schema 1 objects."""
    links = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            link = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        if not isinstance(link, list) or len(link) < 6:
            raise WorkflowError(f"malformed link {link!r} in the workflow")
        links[link[0]] = tuple(link[1:6])
    return links


class _Converter:
    def __init__(self, ui: dict, defs: NodeDefs):
        self.defs, self.links = defs, _links(ui)
        self.nodes = {node.get("id"): node for node in ui["nodes"] if isinstance(node, dict)}
        subgraphs = (ui.get("definitions") or {}).get("subgraphs") or []
        self.subgraphs = {g.get("id"): g.get("name") for g in subgraphs if isinstance(g, dict)}
        self.group_nodes = (ui.get("extra") or {}).get("groupNodes") or {}

    def check_supported(self, node: dict) -> None:
        """Subgraphs and group nodes are containers the editor flattens when it queues; this converter does not."""
        class_type, where = node.get("type"), f"node {node.get('id')}"
        if isinstance(class_type, str) and class_type in self.subgraphs:
            raise WorkflowError(
                f"{where} is the subgraph {self.subgraphs[class_type]!r}: the headless runner does not support "
                "subgraphs yet; in the editor, right-click it, choose Unpack Subgraph, and save the workflow again"
            )
        if isinstance(class_type, str) and re.sub(r"^workflow[>/]", "", class_type) in self.group_nodes:
            raise WorkflowError(
                f"{where} is the group node {class_type!r}: the headless runner does not support group nodes; in "
                "the editor, right-click it, choose Convert to nodes, and save the workflow again"
            )

    def widget_values(self, node: dict, defn: NodeDef) -> dict:
        values = node.get("widgets_values")
        if isinstance(values, dict):  # some nodes save widgets by name
            return {n: _wrap(values.get(n, defn.inputs[n].default())) for n in defn.widget_slots if n is not None}
        values = values if isinstance(values, list) else []
        return {
            name: _wrap(values[i] if i < len(values) else defn.inputs[name].default())
            for i, name in enumerate(defn.widget_slots) if name is not None
        }  # fmt: skip

    def resolve(self, link_id, want_type, seen: set):
        """What a link delivers after Reroutes, Primitives and bypassed nodes: ["<id>", slot], a constant, or None."""
        if link_id not in self.links:
            raise WorkflowError(f"the workflow refers to link {link_id}, which it does not contain")
        origin_id, slot, *_ = self.links[link_id]
        origin = self.nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} comes from node {origin_id}, which the workflow does not contain")
        if (origin_id, slot) in seen:
            raise WorkflowError(f"links loop through node {origin_id} (Reroute or bypassed nodes in a circle)")
        seen.add((origin_id, slot))
        inputs = origin.get("inputs") or []
        if origin.get("type") == "PrimitiveNode":  # it writes its value into the widget it feeds
            values = origin.get("widgets_values") or []
            return ("value", _wrap(values[0])) if values else None
        if origin.get("mode") == BYPASSED:  # the editor then matches types against the bypassed node's input
            slot = _bypass_slot(origin, slot, want_type)
            want_type = inputs[slot].get("type") if 0 <= slot < len(inputs) else None
        elif origin.get("type") not in VIRTUAL:
            return [str(origin_id), slot]
        if not 0 <= slot < len(inputs) or inputs[slot].get("link") is None:
            return None
        return self.resolve(inputs[slot]["link"], want_type, seen)

    def convert(self) -> dict:
        api = {}
        order = sorted(self.nodes.values(), key=lambda n: (n.get("order") or 0, str(n.get("id"))))
        for node in order:
            class_type = node.get("type")
            if class_type in VIRTUAL or node.get("mode") in (MUTED, BYPASSED):
                continue
            self.check_supported(node)
            defn = self.defs.get(class_type)
            inputs = self.widget_values(node, defn) if defn is not None else {}
            for inp in node.get("inputs") or []:
                if inp.get("link") is None:
                    continue
                source = self.resolve(inp["link"], inp.get("type"), set())
                if source is not None:
                    inputs[inp["name"]] = source[1] if isinstance(source, tuple) else source
            title = node.get("title") or self.defs.display_name(class_type)
            api[str(node.get("id"))] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}
        for node in api.values():  # links from muted nodes vanish, as in the editor
            node["inputs"] = {k: v for k, v in node["inputs"].items() if not is_link(v) or v[0] in api}
        return api


def _bypass_slot(node: dict, slot: int, want_type) -> int:
    """The input a bypassed node passes to output `slot`, chosen as the editor does; -1 when none fits."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type") if 0 <= slot < len(outputs) else None
    if want_type in ANY:
        return slot if len(inputs) > slot else 0
    types = [inp.get("type") for inp in inputs]
    if slot < len(types) and types_match(types[slot], out_type) and types_match(types[slot], want_type):
        return slot
    if want_type in types:
        return types.index(want_type)
    return next((i for i, t in enumerate(types) if types_match(t, out_type) and types_match(t, want_type)), -1)


def to_api(ui: dict, defs: NodeDefs) -> dict:
    """The API-format prompt the editor would queue for this UI-format workflow."""
    try:
        return _Converter(ui, defs).convert()
    except (TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:  # fields of the wrong shape
        raise WorkflowError(f"malformed editor workflow ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------- --set


def _title(node: dict):
    meta = node.get("_meta")
    return meta.get("title") if isinstance(meta, dict) else None


def _find_node(prompt: dict, ref: str) -> str:
    if ref in prompt:
        return ref
    matches = [i for i, node in prompt.items() if _title(node) == ref]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise WorkflowError(f"title {ref!r} names nodes {', '.join(matches)}; use the node id")
    known = ", ".join(f"{i} ({_title(n) or n.get('class_type')})" for i, n in prompt.items())
    raise WorkflowError(f"no node with id or title {ref!r}; nodes: {known}")


def _parse_value(raw: str, inp: Input):
    """Text of --set -> a value of the input's declared type; ValueError naming what fits when the text does not."""
    if inp.type == "STRING" or (inp.choices and raw in inp.choices):
        return raw
    if inp.type == "BOOLEAN":
        if raw.strip().lower() not in BOOLEAN_WORDS:
            raise ValueError("true/false, yes/no, on/off or 1/0")
        return BOOLEAN_WORDS[raw.strip().lower()]
    if inp.type == "INT":
        if not re.fullmatch(r"\s*[+-]?\d+\s*", raw):
            raise ValueError("a whole number")
        return int(raw)
    if inp.type == "FLOAT":
        try:
            return float(raw)  # NaN and inf parse here and are refused by validation, as in a workflow file
        except ValueError:
            raise ValueError("a number") from None
    try:
        return json.loads(raw)  # COMBO choices that are numbers, "*" inputs
    except ValueError:
        return raw


def set_inputs(prompt: dict, assignments, defs: NodeDefs, ui: dict | None = None) -> None:
    """Applies NODE.INPUT=VALUE overrides (node by id or title) to the prompt, and to the UI workflow's widgets."""
    for text in assignments:
        target, sep, raw = text.partition("=")
        ref, dot, name = target.rpartition(".")
        if not (sep and dot and ref and name):
            raise WorkflowError(f"--set {text!r}: expected NODE.INPUT=VALUE, e.g. 3.seed=42 or 6.text=\"a cat\"")
        node_id = _find_node(prompt, ref)
        class_type = prompt[node_id].get("class_type")
        defn = defs.get(class_type)
        if defn is None:
            raise WorkflowError(f"--set {text!r}: node {node_id} has the unknown class {class_type!r}")
        if name not in defn.inputs:
            raise WorkflowError(
                f"--set {text!r}: node {node_id} ({class_type}) has no input {name!r}; its inputs: {', '.join(defn.inputs)}"
            )
        inp = defn.inputs[name]
        if not takes_constants(inp):
            raise WorkflowError(f"--set {text!r}: {name!r} is a {inp.type} input, fed by a link, not a value")
        try:
            value = _parse_value(raw, inp)
        except ValueError as e:
            raise WorkflowError(f"--set {text!r}: {name!r} is of type {inp.type}; expected {e}, not {raw!r}") from None
        inputs = prompt[node_id].setdefault("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"--set {text!r}: node {node_id}'s inputs are not an object of name: value")
        inputs[name] = _wrap(value)
        if ui is not None:
            _set_widget(ui, node_id, defn, name, value)


def _set_widget(ui: dict, node_id: str, defn: NodeDef, name: str, value) -> None:
    """Keeps the UI workflow (embedded in the PNGs) telling the same story as the prompt that ran."""
    node = next((n for n in ui["nodes"] if isinstance(n, dict) and str(n.get("id")) == node_id), None)
    values = node.get("widgets_values") if node is not None else None
    if isinstance(values, dict):
        values[name] = value
    elif isinstance(values, list) and name in defn.widget_slots:
        index = defn.widget_slots.index(name)
        values.extend([None] * (index + 1 - len(values)))
        values[index] = value


# ---------------------------------------------------------------------------------------------- validation


def _error(kind: str, message: str, details: str = "", input_name: str | None = None, **extra) -> dict:
    extra_info = {"input_name": input_name, **extra} if input_name is not None else extra
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _check_value(inp: Input, value, check_range: bool):
    """ComfyUI's conversion, then range/list checks, of a constant input: (value, error or None)."""
    converters = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
    try:
        if inp.type == "BOOLEAN" and isinstance(value, str):  # bool("false") is True
            raise ValueError("use true or false, not text")
        value = converters[inp.type](value) if inp.type in converters else value
    except (TypeError, ValueError, OverflowError) as e:
        kind = "invalid_input_type"
        return value, _error(kind, f"Failed to convert an input value to a {inp.type} value", f"{inp.name}, {value}, {e}",
                             inp.name, received_value=value)  # fmt: skip
    if isinstance(value, float) and not math.isfinite(value):
        return value, _error("value_not_finite", f"Value {value} is not a finite number", inp.name, inp.name,
                             received_value=value)  # fmt: skip
    if not check_range:
        return value, None
    if "min" in inp.options and value < inp.options["min"]:
        msg = f"Value {value} smaller than min of {inp.options['min']}"
        return value, _error("value_smaller_than_min", msg, inp.name, inp.name, received_value=value)
    if "max" in inp.options and value > inp.options["max"]:
        msg = f"Value {value} bigger than max of {inp.options['max']}"
        return value, _error("value_bigger_than_max", msg, inp.name, inp.name, received_value=value)
    if inp.type == "COMBO" and value not in (inp.choices or []):
        listed = str(inp.choices) if len(inp.choices or []) <= 20 else f"(list of length {len(inp.choices)})"
        return value, _error("value_not_in_list", "Value not in list", f"{inp.name}: '{value}' not in {listed}",
                             inp.name, received_value=value)  # fmt: skip
    return value, None


def _custom_validation(defn: NodeDef, inputs: dict, received_types: dict) -> list:
    """Calls the node's VALIDATE_INPUTS with its constant inputs (links as None), as ComfyUI does."""
    spec = inspect.getfullargspec(defn.cls.VALIDATE_INPUTS)
    wanted = {n: (None if is_link(v) else unwrap(v)) for n, v in inputs.items() if n in spec.args or spec.varkw}
    if "input_types" in spec.args:
        wanted["input_types"] = received_types
    result = defn.cls.VALIDATE_INPUTS(**wanted)
    if result is True:
        return []
    name = next(iter(wanted), "")
    details = name if result is False else f"{name} - {result}"
    return [_error("custom_validation_failed", "Custom validation failed for node", details, name)]


def _check_node(node_id: str, node: dict, prompt: dict, defs: NodeDefs) -> list:
    defn = defs.get(node["class_type"])
    inputs = node.setdefault("inputs", {})
    if not isinstance(inputs, dict):
        return [_error("invalid_prompt", "inputs must be an object of name: value", f"Node ID '#{node_id}'")]
    custom = getattr(defn.cls, "VALIDATE_INPUTS", None)
    claimed = set()
    if custom is not None:
        spec = inspect.getfullargspec(custom)
        claimed = set(defn.inputs) if spec.varkw else set(spec.args)
    errors, received_types = [], {}
    for name, inp in defn.inputs.items():
        if name not in inputs:
            if inp.required:
                errors.append(_error("required_input_missing", "Required input is missing", name, name))
            continue
        value = inputs[name]
        if isinstance(value, list):
            source = prompt.get(str(value[0])) if len(value) == 2 else None
            source_def = defs.get(source.get("class_type")) if isinstance(source, dict) else None
            if source is None or not isinstance(value[1], int):
                errors.append(_error("bad_linked_input", f"Bad linked input {value}: no such node output", name, name,
                                     received_value=value))  # fmt: skip
                continue
            value = inputs[name] = [str(value[0]), value[1]]
            if source_def is None:
                continue  # the unknown source class is reported on its own node
            if not 0 <= value[1] < len(source_def.outputs):
                msg = f"Linked node {value[0]} ({source['class_type']}) has no output {value[1]}"
                errors.append(_error("bad_linked_input", msg, name, name, received_value=value))
                continue
            received = received_types[name] = source_def.outputs[value[1]]
            if "input_types" not in claimed and not types_match(received, inp.type):
                details = f"{name}, received_type({received}) mismatch input_type({inp.type})"
                errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes", details,
                                     name, received_type=received, linked_node=value))  # fmt: skip
            continue
        if not takes_constants(inp):
            msg = f"A {inp.type} input needs a link from another node's output, not a constant"
            errors.append(_error("invalid_input_type", msg, name, name, received_value=value))
            continue
        # VALIDATE_INPUTS takes over the range and list checks of the inputs it names
        value, error = _check_value(inp, unwrap(value), check_range=name not in claimed)
        inputs[name] = _wrap(value)  # a list constant stays wrapped: a bare list is a link
        if error:
            errors.append(error)
    if custom is not None and not errors:
        errors += _custom_validation(defn, inputs, received_types)
    return errors


def dependency_order(prompt: dict, node_ids) -> tuple[list, set]:
    """Nodes in an order where each comes after the nodes it links from, and the set left over by cycles."""
    position = {i: k for k, i in enumerate(node_ids)}
    wanted = set(position)
    inputs = {i: prompt[i].get("inputs") if isinstance(prompt[i].get("inputs"), dict) else {} for i in position}
    parents = {i: {v[0] for v in inputs[i].values() if is_link(v) and v[0] in wanted} for i in position}
    children = {i: set() for i in position}
    for i, ps in parents.items():
        for p in ps:
            children[p].add(i)
    pending = {i: len(ps) for i, ps in parents.items()}
    ready = [i for i in position if pending[i] == 0]
    order = []
    while ready:
        node_id = ready.pop(0)
        order.append(node_id)
        for child in sorted(children[node_id], key=position.get):
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    left = wanted - set(order)
    # Keep only nodes on a cycle: drop those feeding nothing left over, until stable.
    while True:
        dead = {i for i in left if not (children[i] & left)}
        if not dead:
            return order, left
        left -= dead


def validate(prompt: dict, defs: NodeDefs) -> tuple[dict | None, dict]:
    """ComfyUI's /prompt validation of the whole graph: (error, node_errors), both empty when it may run.

    Constant inputs are normalised in place as ComfyUI does (INT/FLOAT/STRING/BOOLEAN conversion); array constants
    stay wrapped as {"__value__": [...]} so that no constant is taken for a link (`unwrap` gives the value).
    """
    if not is_api(prompt):
        return _error("invalid_prompt", "The prompt must be an object of node id: {class_type, inputs}"), {}
    node_errors = {}

    def report(node_id, errors):
        if errors:
            entry = node_errors.setdefault(node_id, {"errors": [], "class_type": prompt[node_id]["class_type"]})
            entry["errors"] += errors

    for node_id, node in prompt.items():
        class_type = node["class_type"]
        try:
            defn = defs.get(class_type)
            if defn is None:
                msg = f"Node class {class_type!r} does not exist; is the node pack that provides it installed?"
                report(node_id, [_error("invalid_prompt", msg, f"Node ID '#{node_id}'")])
                continue
            report(node_id, _check_node(node_id, node, prompt, defs))
        except Exception as e:  # a node's own INPUT_TYPES/VALIDATE_INPUTS failing is reported, not raised
            report(node_id, [_error("exception_during_validation", "Exception when validating node", f"{type(e).__name__}: {e}")])
    _, cycle = dependency_order(prompt, prompt)
    for node_id in sorted(cycle):
        name = next(n for n, v in prompt[node_id]["inputs"].items() if is_link(v) and v[0] in cycle)
        path = " -> ".join(sorted(cycle))
        report(node_id, [_error("dependency_cycle", "Dependency cycle detected", f"nodes {path}", name)])
    outputs = [i for i, n in prompt.items() if (d := defs.get(n["class_type"])) is not None and d.output_node]
    error = None
    if not outputs:
        error = _error("prompt_no_outputs", "Prompt has no outputs", "add an output node such as Save Image")
    elif node_errors:
        error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation")
    return error, node_errors


def format_errors(error: dict | None, node_errors: dict) -> list[str]:
    """One line per problem: node id, class, input, message (and details)."""
    lines = []
    for node_id, entry in node_errors.items():
        for e in entry.get("errors", []):
            name = (e.get("extra_info") or {}).get("input_name")
            where = f"node {node_id} ({entry.get('class_type')})" + (f" input '{name}'" if name else "")
            details = str(e.get("details") or "")
            if e.get("type") == "custom_validation_failed" and details.startswith(f"{name} - "):
                lines.append(f"{where}: {details[len(name) + 3:]}")  # the node's own words say it all
                continue
            details = f" [{details}]" if details and details != name else ""
            lines.append(f"{where}: {e.get('message')}{details}")
    if error and (not lines or error.get("type") != "prompt_outputs_failed_validation"):
        lines.append(f"{error.get('message')}" + (f": {error['details']}" if error.get("details") else ""))
    return lines
