"""Server mode: submits a prompt to a running ComfyUI (POST /prompt), follows it over the websocket, and downloads
the images it made (GET /history, /view) into the local output folder. Standard library only: urllib for HTTP and
a minimal RFC 6455 websocket client (text and binary messages, fragments, ping/pong, close).
"""
import base64
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from . import host
from .standins import expand_dates, inside, preview_dir, write_new
from .workflow import NodeDefs, WorkflowError, format_errors, parse_json

MAX_SERVER_JSON = 64 * 2**20  # /object_info of an install with many packs is large
MAX_MESSAGE = 64 * 2**20  # one websocket message (previews are the largest)
MAX_DOWNLOAD = 2**30
HTTP_TIMEOUT = 60
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class RemoteError(WorkflowError):
    """The server could not be reached, refused the request, or the prompt failed there."""


class WebSocket:
    """A minimal websocket client: enough for ComfyUI's /ws (server -> client messages, ping/pong, close)."""

    def __init__(self, url: str, timeout: float, server: str):
        self.server = server  # the name its errors give the server
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "wss"
        self.sock = socket.create_connection((parts.hostname, parts.port or (443 if secure else 80)), timeout=timeout)
        if secure:
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=parts.hostname)
        self.buffer = bytearray()
        key = base64.b64encode(os.urandom(16)).decode()
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 65536:
                raise RemoteError(f"the websocket handshake answer of {server} is too long")
            self._fill(len(self.buffer) + 1)
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if status.split()[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept:
            raise RemoteError(f"{server} did not open a websocket at {url} (answered {status!r})")

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RemoteError(f"{self.server} closed the websocket connection")
            self.buffer += chunk

    def _take(self, size: int) -> bytes:
        self._fill(size)
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def send(self, opcode: int, payload: bytes = b"") -> None:
        """One final, masked frame (clients must mask)."""
        mask = os.urandom(4)
        size = len(payload)
        length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode]) + length + mask + masked)

    def recv(self, timeout: float) -> str | bytes:
        """The next text (str) or binary (bytes) message; answers pings on the way."""
        self.sock.settimeout(max(timeout, 0.001))
        message, kind = bytearray(), None
        while True:
            first, second = self._take(2)
            opcode, size = first & 0x0F, second & 0x7F
            if size >= 126:
                size = int.from_bytes(self._take(2 if size == 126 else 8), "big")
            mask = self._take(4) if second & 0x80 else None
            if len(message) + size > MAX_MESSAGE:
                raise RemoteError(f"a websocket message from {self.server} exceeds {MAX_MESSAGE // 2**20} MiB")
            payload = self._take(size)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise RemoteError(f"{self.server} closed the websocket connection")
            if opcode == 0x9:
                self.send(0xA, payload)
            elif opcode in (0x0, 0x1, 0x2):
                kind = opcode if opcode else kind
                message += payload
                if first & 0x80 and kind == 0x1:
                    try:
                        return message.decode()
                    except UnicodeDecodeError:
                        raise RemoteError(f"{self.server} sent a websocket text message that is not UTF-8") from None
                if first & 0x80:
                    return bytes(message)

    def close(self) -> None:
        try:
            self.send(0x8, (1000).to_bytes(2, "big"))
        except OSError:
            pass  # already gone
        self.sock.close()


def _read(response, limit: int, what: str) -> bytes:
    data = response.read(limit + 1)
    if len(data) > limit:
        raise RemoteError(f"{what} from the server exceeds {limit // 2**20} MiB")
    return data


def _copy(response, file, limit: int, what: str) -> None:
    total = 0
    while chunk := response.read(2**20):
        total += len(chunk)
        if total > limit:
            raise RemoteError(f"{what} exceeds {limit // 2**20} MiB")
        file.write(chunk)
    promised = response.headers.get("Content-Length", "")
    if promised.isdigit() and total != int(promised):  # read() ends quietly when the connection drops
        raise RemoteError(f"{what} broke off after {total} of {promised} bytes")


class Server:
    def __init__(self, url: str):
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # raises on a port that is not a number in range
        except ValueError as e:
            raise RemoteError(f"--server {url!r}: {e}; expected a URL such as http://127.0.0.1:8188") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"--server {url!r}: expected an http(s) URL such as http://127.0.0.1:8188")
        self.base = url.rstrip("/")

    def _open(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data, {"Content-Type": "application/json"} if data else {})
        try:
            return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as e:
            raise RemoteError(f"cannot reach the ComfyUI server at {self.base}: {getattr(e, 'reason', e)}") from None
        except (http.client.HTTPException, ValueError) as e:  # BadStatusLine, InvalidURL...
            raise RemoteError(f"{self.base} did not answer {path} as an HTTP server: {type(e).__name__}: {str(e)[:100]!r}") from None

    def _json(self, path: str, body: dict | None = None) -> dict:
        """The JSON object answering a request; a refusal of /prompt (HTTP 400) as the errors it names."""
        what = f"the answer of {self.base} to {path}"
        try:
            with self._open(path, body) as response:
                answer = parse_json(_read(response, MAX_SERVER_JSON, path), what, MAX_SERVER_JSON)
        except urllib.error.HTTPError as e:
            answer = e.read(MAX_SERVER_JSON)
            if path == "/prompt" and e.code == 400:
                raise _refusal(parse_json(answer, what, MAX_SERVER_JSON), self.base) from None
            raise RemoteError(f"{path} on {self.base}: HTTP {e.code} {e.reason}: {answer[:300].decode(errors='replace')}") from None
        except http.client.HTTPException as e:  # the body broke off
            raise RemoteError(f"{what} broke off: {type(e).__name__}: {str(e)[:100]!r}") from None
        if not isinstance(answer, dict):
            raise RemoteError(f"{what} is a JSON {type(answer).__name__}, not an object: {str(answer)[:200]}")
        return answer

    def node_defs(self) -> NodeDefs:
        """The server's node definitions (for UI -> API conversion and --set)."""
        info = self._json("/object_info")
        bad = next((name for name, d in info.items() if not isinstance(d, dict)), None)
        if bad is not None:
            raise RemoteError(f"the node definitions of {self.base} (/object_info) give {bad!r} as {str(info[bad])[:100]}, not an object")
        try:
            return NodeDefs.from_object_info(info)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
            raise RemoteError(f"the node definitions of {self.base} (/object_info) are malformed: {type(e).__name__}: {e}") from None

    def run(self, prompt: dict, extra_pnginfo: dict, output_dir: Path, timeout: float) -> list[Path]:
        """Queues the prompt, follows it to the end, downloads its images; the local paths written."""
        client_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        parts = urllib.parse.urlsplit(self.base)
        ws_url = urllib.parse.urlunsplit(
            ("wss" if parts.scheme == "https" else "ws", parts.netloc, parts.path + "/ws", f"clientId={client_id}", "")
        )
        try:
            ws = WebSocket(ws_url, HTTP_TIMEOUT, self.base)
        except OSError as e:
            raise RemoteError(f"cannot open the websocket {ws_url}: {e}") from None
        try:
            body = {"prompt": _as_the_editor_queues(prompt), "client_id": client_id,
                    "extra_data": {"extra_pnginfo": extra_pnginfo}}  # fmt: skip
            answer = self._json("/prompt", body)
            prompt_id = answer.get("prompt_id")
            if not isinstance(prompt_id, str):
                raise RemoteError(f"{self.base} answered POST /prompt without a prompt_id: {str(answer)[:300]}")
            for line in _error_lines(None, answer.get("node_errors")):  # outputs the server will skip
                print(f"warning: {line}", file=sys.stderr)
            print(f"queued as {prompt_id} on {self.base}", file=sys.stderr)
            _follow(ws, prompt_id, prompt, deadline)
        except TimeoutError:
            raise RemoteError(f"no result from {self.base} within {timeout:g}s (the prompt may still be running)") from None
        except OSError as e:
            raise RemoteError(f"lost the websocket connection to {self.base}: {e}") from None
        finally:
            ws.close()
        history = self._json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
        if not isinstance(history, dict) or not isinstance(history.get("outputs") or {}, dict):
            raise RemoteError(f"{self.base} has no history entry with outputs for prompt {prompt_id}")
        items = [
            item for out in (history.get("outputs") or {}).values() if isinstance(out, dict)
            for values in out.values() if isinstance(values, list)
            for item in values if isinstance(item, dict) and isinstance(item.get("filename"), str)
        ]  # fmt: skip
        return [self.download(item, output_dir) for item in items]

    def download(self, item: dict, output_dir: Path) -> Path:
        """One output file via /view, saved under its subfolder with a new local counter (never overwriting)."""
        kind = item.get("type") or "output"
        try:
            folder = inside(output_dir if kind == "output" else preview_dir(), str(item.get("subfolder") or "."), "server subfolder")
        except ValueError as e:
            raise RemoteError(f"refusing an output of {self.base}: {e}") from None
        name = Path(str(item["filename"]).replace("\\", "/")).name  # never a path chosen by the server
        match = re.fullmatch(r"(.+)_\d+_(\.\w+)", name)
        prefix, suffix = match.groups() if match else (Path(name).stem or "ComfyUI", Path(name).suffix or ".png")
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder") or "", "type": kind})
        try:
            with self._open(f"/view?{query}") as response:
                return write_new(folder, prefix, lambda f: _copy(response, f, MAX_DOWNLOAD, f"{name} from {self.base}"), suffix)
        except urllib.error.HTTPError as e:
            raise RemoteError(f"downloading {name} from {self.base}: HTTP {e.code} {e.reason}") from None
        except http.client.HTTPException as e:  # the body broke off
            raise RemoteError(f"downloading {name} from {self.base}: {type(e).__name__}: {str(e)[:100]!r}") from None


def _as_the_editor_queues(prompt: dict) -> dict:
    """The prompt with %date:FORMAT% in filename prefixes expanded, as ComfyUI's editor queues it."""
    out = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and isinstance(inputs.get("filename_prefix"), str):
            node = {**node, "inputs": {**inputs, "filename_prefix": expand_dates(inputs["filename_prefix"])}}
        out[node_id] = node
    return out


def _error_lines(error, node_errors) -> list[str]:
    """format_errors of what a server sent, which may be of any shape."""
    try:
        return format_errors(error if isinstance(error, dict) else None, node_errors if isinstance(node_errors, dict) else {})
    except (AttributeError, TypeError, ValueError) as e:
        return [f"(errors in a form not understood: {type(e).__name__}: {str(node_errors)[:200]})"]


def _refusal(refusal, base: str) -> WorkflowError:
    """The error for a POST /prompt answered with HTTP 400."""
    if not isinstance(refusal, dict):
        return RemoteError(f"the server at {base} refused the workflow (HTTP 400) with a JSON {type(refusal).__name__}: "
                           f"{str(refusal)[:200]}")  # fmt: skip
    lines = _error_lines(refusal.get("error"), refusal.get("node_errors"))
    return RemoteError(f"the server at {base} refused the workflow:\n  " + "\n  ".join(lines or ["(no reason given)"]))


def _follow(ws: WebSocket, prompt_id: str, prompt: dict, deadline: float) -> None:
    """Prints the prompt's progress until the server reports it finished; raises on its errors."""
    bar = None
    while True:
        message = ws.recv(deadline - time.monotonic())
        if isinstance(message, bytes):
            continue  # preview images
        message = parse_json(message, f"a websocket message from {ws.server}", MAX_MESSAGE)
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            continue
        kind, data = message.get("type"), message["data"]
        if data.get("prompt_id") != prompt_id:
            continue  # queue status, other clients' prompts
        node = data.get("node") or data.get("node_id")
        where = f"node {node} ({data.get('node_type') or (prompt.get(str(node)) or {}).get('class_type', '?')})"
        if kind == "executing":
            if node is None:  # sent after the history entry is written
                return
            print(f"running {where}", file=sys.stderr, flush=True)
            bar = None
        elif kind == "progress" and all(isinstance(data.get(k), (int, float)) for k in ("value", "max")):
            bar = bar or host.progress_bar(data["max"])
            bar.update_absolute(data["value"], data["max"])
        elif kind == "execution_cached" and isinstance(data.get("nodes"), list) and data["nodes"]:
            print(f"cached: nodes {', '.join(map(str, data['nodes']))}", file=sys.stderr)
        elif kind == "execution_error":
            raise RemoteError(
                f"{where} failed on the server: {data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}"
            )
        elif kind == "execution_interrupted":
            raise RemoteError(f"the prompt was interrupted on the server at {where}")
