"""Server mode against a fake ComfyUI: a loopback HTTP + websocket server written here that speaks ComfyUI's
protocol (POST /prompt, /ws, /history, /view, /object_info), bounded in time and stopping by itself."""
import base64
import hashlib
import io
import json
import queue
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from test_workflow import SAMPLE_API, defs, load, sample_ui

runner = load("runner")
LIFETIME = 30  # seconds before the fake server shuts itself down, whatever happens
PROMPT_ID = "b0b0b0b0-0000-4000-8000-000000000001"


def png_bytes(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A server frame (unmasked)."""
    size = len(payload)
    length = bytes([size]) if size < 126 else bytes([126]) + size.to_bytes(2, "big")
    return bytes([(0x80 if fin else 0) | opcode]) + length + payload


def read_client_frame(rfile) -> tuple[int, bytes]:
    first, second = rfile.read(2)
    size = second & 0x7F
    if size == 126:
        size = int.from_bytes(rfile.read(2), "big")
    assert second & 0x80, "client frames must be masked"
    mask = rfile.read(4)
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(rfile.read(size)))


class FakeComfy:
    """scenario: "success", "refuse" (400 with node_errors), "fail" (execution_error), "escape" (bad subfolder), or
    a misbehaviour: "garbage" (no HTTP at all), "info list", "info entry", "refuse list", "history list", "ws bytes"
    (a text frame that is not UTF-8), "view cut" (an image download that breaks off)."""

    def __init__(self, scenario: str):
        self.scenario, self.posted, self.views, self.pongs, self.client_ids = scenario, [], [], [], []
        self.queued = queue.Queue()
        self.image = png_bytes(123)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a client hanging up is no news here
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.timer = threading.Timer(LIFETIME, self.httpd.shutdown)

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def messages(self):
        d = {"prompt_id": PROMPT_ID}
        yield {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}, "sid": "x"}}
        yield {"type": "execution_start", "data": d}
        yield {"type": "execution_cached", "data": {**d, "nodes": ["1"]}}
        yield {"type": "executing", "data": {**d, "node": "7", "display_node": "7"}}
        yield {"type": "progress", "data": {**d, "node": "7", "value": 1, "max": 3}}
        yield {"type": "executing", "data": {"prompt_id": "someone-else", "node": None}}
        if self.scenario == "fail":
            yield {"type": "execution_error", "data": {**d, "node_id": "7", "node_type": "Sampler", "exception_type":
                   "torch.OutOfMemoryError", "exception_message": "CUDA out of memory\n", "traceback": []}}  # fmt: skip
            return
        yield {"type": "progress", "data": {**d, "node": "7", "value": 3, "max": 3}}
        yield {"type": "executed", "data": {**d, "node": "10", "output": {"images": []}}}
        yield {"type": "execution_success", "data": d}
        yield {"type": "executing", "data": {**d, "node": None}}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def log_message(self, *args):
                pass

            def answer(self, status: int, body: bytes, kind: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def garbage(self) -> bool:
                if fake.scenario == "garbage":
                    self.wfile.write(bytes(range(256)) + b"\r\n\r\n")
                    self.close_connection = True
                return fake.scenario == "garbage"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.posted.append(body)
                if fake.scenario == "refuse list":
                    return self.answer(400, b'["no", "reasons"]')
                if fake.scenario == "refuse":
                    error = {"type": "value_not_in_list", "message": "Value not in list",
                             "details": "mode: 'dpm' not in ['euler', 'heun']", "extra_info": {"input_name": "mode", "received_value": "dpm"}}  # fmt: skip
                    refusal = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                                         "details": "", "extra_info": {}},
                               "node_errors": {"7": {"errors": [error], "dependent_outputs": ["10"], "class_type": "Sampler"}}}  # fmt: skip
                    return self.answer(400, json.dumps(refusal).encode())
                fake.queued.put(PROMPT_ID)
                self.answer(200, json.dumps({"prompt_id": PROMPT_ID, "number": 0, "node_errors": {}}).encode())

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if self.garbage():
                    return
                if url.path == "/object_info" and fake.scenario in ("info list", "info entry"):
                    return self.answer(200, b"[1, 2]" if fake.scenario == "info list" else b'{"SaveImage": 5}')
                if url.path == "/object_info":
                    d = defs()
                    info = {n: {"input": c.INPUT_TYPES(), "output": c.RETURN_TYPES, "output_node": getattr(c, "OUTPUT_NODE", False),
                                "display_name": d.display_name(n)} for n, c in d.classes.items()}  # fmt: skip
                    return self.answer(200, json.dumps(info).encode())
                if url.path == "/ws":
                    return self.websocket(query["clientId"])
                if url.path == f"/history/{PROMPT_ID}":
                    subfolder = "../../evil" if fake.scenario == "escape" else "flux"
                    image = {"filename": "test_00041_.png", "subfolder": subfolder, "type": "output"}
                    history = {PROMPT_ID: {"outputs": {"10": {"images": [image]}}, "status": {"status_str": "success"}}}
                    return self.answer(200, json.dumps([history] if fake.scenario == "history list" else history).encode())
                if url.path == "/view":
                    fake.views.append(query)
                    if fake.scenario == "view cut":  # promises more bytes than it sends
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(fake.image) + 100))
                        self.end_headers()
                        self.wfile.write(fake.image)
                        self.close_connection = True
                        return
                    return self.answer(200, fake.image, "image/png")
                self.answer(404, b"{}")

            def websocket(self, client_id: str):
                fake.client_ids.append(client_id)
                key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
                self.end_headers()
                self.wfile.write(frame(0x9, b"are you there"))
                fake.pongs.append(read_client_frame(self.rfile))
                fake.queued.get(timeout=10)  # the client connects before it queues the prompt
                self.wfile.write(frame(0x2, b"\x00\x00\x00\x01preview bytes"))
                if fake.scenario == "ws bytes":
                    self.wfile.write(frame(0x1, b'{"type": "\xff\xfe"}'))
                for i, message in enumerate(fake.messages()):
                    data = json.dumps(message).encode()
                    if i == 3:  # one message in two fragments with a ping between them
                        self.wfile.write(frame(0x1, data[:10], fin=False) + frame(0x9, b"") + frame(0x0, data[10:]))
                        fake.pongs.append(read_client_frame(self.rfile))
                    else:
                        self.wfile.write(frame(0x1, data))
                self.close_connection = True
                while read_client_frame(self.rfile)[0] != 0x8:  # until the client says goodbye
                    pass

        return Handler


def server_cli(tmp_path, fake, workflow, *args):
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    return runner.main(["run", str(path), "--server", fake.url, "--output", str(tmp_path / "out"), "--timeout", "20", *args])


def test_server_mode_submits_follows_and_downloads(tmp_path, capsys):
    with FakeComfy("success") as fake:
        assert server_cli(tmp_path, fake, sample_ui(), "--set", "7.seed=5") == 0
        assert server_cli(tmp_path, fake, sample_ui()) == 0
    body = fake.posted[0]
    expected = {**SAMPLE_API, "7": {**SAMPLE_API["7"], "inputs": {**SAMPLE_API["7"]["inputs"], "seed": 5}}}
    assert body["prompt"] == expected  # converted with the server's /object_info
    assert body["client_id"] == fake.client_ids[0]
    workflow = body["extra_data"]["extra_pnginfo"]["workflow"]
    assert next(n for n in workflow["nodes"] if n["id"] == 7)["widgets_values"][0] == 5
    assert fake.pongs[:2] == [(0xA, b"are you there"), (0xA, b"")]
    assert fake.views[0] == {"filename": "test_00041_.png", "subfolder": "flux", "type": "output"}
    out = tmp_path / "out" / "flux"
    assert sorted(p.name for p in out.iterdir()) == ["test_00001_.png", "test_00002_.png"]  # local numbering
    assert (out / "test_00001_.png").read_bytes() == fake.image
    captured = capsys.readouterr()
    assert captured.out.split() == [str(out / "test_00001_.png"), str(out / "test_00002_.png")]
    assert "running node 7 (Sampler)" in captured.err and "3/3" in captured.err


def test_server_mode_expands_dates_in_filename_prefixes_as_the_editor(tmp_path):
    with FakeComfy("success") as fake:
        assert server_cli(tmp_path, fake, sample_ui(), "--set", "10.filename_prefix=%date:yyyy-MM-dd%/x") == 0
    prefix = fake.posted[0]["prompt"]["10"]["inputs"]["filename_prefix"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/x", prefix), prefix  # ComfyUI's server would make a "%date..." folder


def test_server_refusal_reports_node_errors(tmp_path, capsys):
    with FakeComfy("refuse") as fake:
        assert server_cli(tmp_path, fake, SAMPLE_API) == 1
    assert fake.posted[0]["prompt"] == SAMPLE_API and fake.posted[0]["extra_data"] == {"extra_pnginfo": {}}
    err = capsys.readouterr().err
    assert f"error: the server at {fake.url} refused the workflow:\n" in err
    assert "node 7 (Sampler) input 'mode': Value not in list [mode: 'dpm' not in ['euler', 'heun']]" in err
    assert not (tmp_path / "out").exists()


def test_server_execution_error_is_reported(tmp_path, capsys):
    with FakeComfy("fail") as fake:
        assert server_cli(tmp_path, fake, sample_ui()) == 1
    assert "error: node 7 (Sampler) failed on the server: torch.OutOfMemoryError: CUDA out of memory" in capsys.readouterr().err
    assert not fake.views


def test_server_output_names_cannot_leave_the_output_folder(tmp_path, capsys):
    with FakeComfy("escape") as fake:
        assert server_cli(tmp_path, fake, sample_ui()) == 1
    assert f"refusing an output of {fake.url}: server subfolder '../../evil' leads outside" in capsys.readouterr().err
    assert not list(tmp_path.parent.glob("evil")) and not fake.views


@pytest.mark.parametrize("url, message", [("ftp://127.0.0.1:1", "expected an http(s) URL"),
                                          ("http://127.0.0.1:1", "cannot reach the ComfyUI server"),
                                          ("http://127.0.0.1:abc", "'http://127.0.0.1:abc': Port could not be cast"),
                                          ("http://127.0.0.1:99999", "'http://127.0.0.1:99999': Port out of range")])  # fmt: skip
def test_bad_or_unreachable_server(tmp_path, capsys, url, message):
    (tmp_path / "wf.json").write_text(json.dumps(SAMPLE_API))
    assert runner.main(["run", str(tmp_path / "wf.json"), "--server", url]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("scenario, message", [
    ("garbage", "did not answer /object_info as an HTTP server: BadStatusLine"),
    ("info list", "to /object_info is a JSON list, not an object: [1, 2]"),
    ("info entry", "(/object_info) give 'SaveImage' as 5, not an object"),
    ("refuse list", "refused the workflow (HTTP 400) with a JSON list: ['no', 'reasons']"),
    ("history list", f"to /history/{PROMPT_ID} is a JSON list, not an object"),
    ("ws bytes", "sent a websocket text message that is not UTF-8"),
    ("view cut", "broke off after"),
])  # fmt: skip
def test_a_misbehaving_server_gets_one_line_naming_it(tmp_path, capsys, scenario, message):
    with FakeComfy(scenario) as fake:
        assert server_cli(tmp_path, fake, SAMPLE_API) == 1
    err = capsys.readouterr().err
    line = err.splitlines()[-1]  # after the progress lines, if any
    assert "Traceback" not in err and err.count("error: ") == 1 and line.startswith("error: "), err
    assert fake.url in line and message in line, line
    assert not list((tmp_path / "out").rglob("*.*"))  # no image, no part file
