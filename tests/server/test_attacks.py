"""Issue 20's attacks on the HTTP edge, against a real `python -m unetpp.server` process with a
small connection cap and short deadlines, each asserting the bound (open files of the server
from /proc, connections dropped, metric label sets, access-log lines, /healthz latency), not
just the status: idle sockets past the open-file limit, headers and bodies that never finish,
answers never read, random paths and methods, forged log fields, hostile /v2 bodies and
headers, a client leaving mid-upload, repeated query parameters, admin without a key."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import LENGTH, binary_request, model_name, scrape, serve, synthetic, value
from unetpp.core.imageio import encode_png

CAP = 64  # UNETPP_MAX_CONNECTIONS
HEADER_TIMEOUT_S, BODY_TIMEOUT_S, MIN_BODY_RATE, WRITE_TIMEOUT_S = 2.0, 1.0, 1000, 1.0
OPEN_FILES = 2600  # the server's RLIMIT_NOFILE: 3,000 sockets are more than it can open
SLACK_FDS = 8  # files the server opens on its own meanwhile (a scrape, a log rotation)
HEALTHY_S = 2.0  # a /healthz that takes longer counts as not answering
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s|$)')


@dataclass
class Server:
    url: str
    pid: int
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def fds(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/fd").iterdir()))

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def health_s(self) -> float:
        start = time.perf_counter()
        assert httpx.get(f"{self.url}/healthz", timeout=HEALTHY_S).status_code == 200
        return time.perf_counter() - start

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def raw(self, request: bytes) -> bytes:
        """One raw request on its own connection; the whole answer."""
        with self.connect() as s:
            s.sendall(request)
            return b"".join(iter(lambda: s.recv(65536), b""))

    def access(self, request_id: str) -> str:
        """The access-log line of a request, once it is written."""
        deadline = time.monotonic() + 10
        while True:
            found = [line for line in self.lines() if f"id={request_id} " in line]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no access line for {request_id}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tiny_repository, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("attacks") / "server.log"
    env = {
        "UNETPP_MAX_CONNECTIONS": str(CAP),
        "UNETPP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "UNETPP_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "UNETPP_MIN_BODY_RATE": str(MIN_BODY_RATE),
        "UNETPP_WRITE_TIMEOUT_S": str(WRITE_TIMEOUT_S),
        "UNETPP_TILE_SIDES": "[]",  # a quiet server: no tile calibration under the attacks
    }
    with serve(tiny_repository, log, **env) as (url, proc):
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
        yield Server(url, proc.pid, log)


def metrics(server: Server) -> dict:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        return scrape(client)


def dropped(server: Server, reason: str) -> float:
    return value(metrics(server), "unetpp_connections_dropped_total", reason=reason)


def closed(s: socket.socket, wait_s: float) -> bool:
    """Whether the server closed `s` (EOF or reset) within `wait_s`; what it sent is ignored."""
    s.settimeout(wait_s)
    try:
        while s.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def settled_fds(server: Server, bound: int) -> int:
    """The server's open files once they are at most `bound`, or after 5 s: the event loop
    may still be closing the connections of the last burst it accepted."""
    deadline = time.monotonic() + 5
    while (fds := server.fds()) > bound and time.monotonic() < deadline:
        time.sleep(0.1)
    return fds


def test_idle_sockets_past_the_open_file_limit_are_dropped_quietly(server):
    dropped_before = sum(dropped(server, r) for r in ("refused", "evicted", "header_timeout"))
    base_fds, base_lines = server.fds(), len(server.lines())
    sockets, peak, latencies = [], base_fds, []
    try:
        for i in range(3000):
            with contextlib.suppress(OSError):  # the listen backlog full for a moment
                sockets.append(server.connect())
            if i % 250 == 0:
                peak = max(peak, server.fds())
                latencies.append(server.health_s())
        held = settled_fds(server, base_fds + CAP + SLACK_FDS)
        latencies += [server.health_s() for _ in range(10)]
        counts = metrics(server)
    finally:
        for s in sockets:
            s.close()
    assert len(sockets) > OPEN_FILES  # more than the server could have open
    assert held <= base_fds + CAP + SLACK_FDS, (held, base_fds)
    assert peak < OPEN_FILES, peak
    assert max(latencies) < HEALTHY_S, latencies
    assert value(counts, "unetpp_connections_open") <= CAP
    assert value(counts, "unetpp_connections_limit") == CAP
    drops = sum(
        value(counts, "unetpp_connections_dropped_total", reason=r)
        for r in ("refused", "evicted", "header_timeout")
    )
    assert drops - dropped_before >= len(sockets) - CAP
    new = server.lines()[base_lines:]
    assert not [line for line in new if "out of system resource" in line]
    # the /healthz and /metrics answers, nothing per dropped connection
    assert len(new) <= len(latencies) + 2, new[:5]


def test_headers_that_never_finish_are_cut_at_the_deadline(server):
    before = dropped(server, "header_timeout")
    sockets = [server.connect() for _ in range(8)]
    start = time.monotonic()
    for s in sockets:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    open_ = list(sockets)
    while open_ and time.monotonic() - start < HEADER_TIMEOUT_S + 5:
        for s in list(open_):
            try:
                s.sendall(b"X-Slow: 1\r\n")  # a header line every 0.25 s, never the blank line
            except OSError:
                open_.remove(s)
                continue
            if closed(s, 0.25 / len(sockets)):
                open_.remove(s)
    elapsed = time.monotonic() - start
    for s in sockets:
        s.close()
    assert not open_ and elapsed < HEADER_TIMEOUT_S + 2, elapsed
    assert dropped(server, "header_timeout") - before == len(sockets)


def test_slow_uploads_get_408_and_health_keeps_answering(server):
    n, length = 48, 100_000
    base_fds = server.fds()
    head = (
        f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {length}\r\nX-Request-ID: slow-{{}}\r\n\r\n"
    )
    sockets = [server.connect() for _ in range(n)]
    for i, s in enumerate(sockets):
        s.sendall(head.format(i).encode() + b"\x89")
    start, latencies, answers = time.monotonic(), [], {}
    while len(answers) < n and time.monotonic() - start < BODY_TIMEOUT_S + 10:
        for i, s in enumerate(sockets):
            if i in answers:
                continue
            try:
                s.sendall(b"P")  # one byte each round: far below the minimum rate
                s.settimeout(0.001)
                answers[i] = s.recv(65536)
            except TimeoutError:
                pass
            except OSError:
                answers[i] = b""  # reset after the answer: the rest of the body was unread
        latencies.append(server.health_s())
    elapsed = time.monotonic() - start
    for s in sockets:
        s.close()
    assert len(answers) == n and elapsed < BODY_TIMEOUT_S + 5, (len(answers), elapsed)
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers.values() if a)
    assert max(latencies) < HEALTHY_S, latencies
    for i in range(n):
        line = server.access(f"slow-{i}")
        assert "status=408 error=body_timeout" in line, line
    deadline = time.monotonic() + 10
    while server.fds() > base_fds + SLACK_FDS:  # every slot freed
        assert time.monotonic() < deadline, (server.fds(), base_fds)
        time.sleep(0.1)


def test_answers_never_read_are_dropped_after_the_write_deadline(server, tiny_repository):
    before = dropped(server, "write_timeout")
    pixels = np.zeros((1, 1, 1024, 1024), np.uint8)
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": list(pixels.shape),
                "parameters": {"binary_data_size": pixels.size},
            }
        ],
        "outputs": [{"name": "logits"}],  # about 20 MB of JSON numbers
    }
    body, headers = binary_request(header, pixels)
    lines = [f"POST /v2/models/{model_name(tiny_repository)}/infer HTTP/1.1", "Host: x"]
    lines += [f"{k}: {v}" for k, v in {**headers, "Content-Length": len(body)}.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    sockets = []
    for _ in range(3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
        s.connect(("127.0.0.1", server.port))
        s.sendall(request)
        sockets.append(s)
    deadline = time.monotonic() + 120
    try:
        while dropped(server, "write_timeout") - before < len(sockets):
            assert time.monotonic() < deadline, dropped(server, "write_timeout") - before
            time.sleep(0.5)
    finally:
        for s in sockets:
            s.close()
    assert value(metrics(server), "unetpp_connections_open") <= 2  # the scrape's own


def test_metric_labels_stay_bounded_and_redirects_never_echo_host(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(300):
            token = uuid.uuid4().hex
            assert client.get(f"/{token}/").status_code == 404
            assert client.get(f"/v1/models/{token}").status_code == 404
            assert client.get(f"/v2/models/{token}/").status_code == 404  # was a 307 per path
            assert client.request(f"M{token}", "/healthz").status_code == 405
        r = client.get("/v1/models/", headers={"Host": "evil.example"})
        assert r.status_code == 404 and "location" not in r.headers, r.headers
        text = client.get("/metrics").text
    assert len(text) < 200_000, len(text)
    labels = [
        s.labels
        for family in text_string_to_metric_families(text)
        if family.name == "unetpp_requests"
        for s in family.samples
    ]
    handlers = {label["handler"] for label in labels}
    assert "unmatched" in handlers and len(handlers) < 20, handlers
    assert not [h for h in handlers if re.search("[0-9a-f]{32}", h)], handlers
    assert {label["method"] for label in labels} <= {"GET", "POST", "other"}


def parse_logfmt(line: str) -> list[tuple[str, str]]:
    message = line.split("unetpp.access: request ", 1)[1]
    fields = [(m.group(1), m.group(2)) for m in LOGFMT.finditer(message)]
    assert "".join(m.group(0) for m in LOGFMT.finditer(message)) == message, message
    return fields


def unquote(text: str) -> str:
    if not text.startswith('"'):
        return text
    return json.loads(text.replace("\\x", "\\u00"))


def test_log_lines_cannot_be_forged_or_inflated(server):
    forged = {
        "newline": "/v1/x%0A2026-01-01 INFO unetpp.access: request id=fake status=200",
        "fields": '/v1/x status=200 error= graph=L4 "ms=1',
        "controls": "/v1/x%1B[31m%E2%80%A8%0D%09%5C",
    }
    paths = {}
    for name, path in forged.items():
        target = path.replace(" ", "%20").replace('"', "%22")
        answer = server.raw(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Request-ID: forge-{name}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 404"), answer[:100]
        paths[name] = httpx.URL(path).path  # what the server decodes
    long_method = "A" * 8192
    answer = server.raw(
        f"{long_method} /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: forge-method\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 405"), answer[:100]
    server.raw(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: plain\r\nConnection: close\r\n\r\n"
    )
    keys = [k for k, _ in parse_logfmt(server.access("plain"))]  # a line no one forged
    for name, path in paths.items():
        fields = parse_logfmt(server.access(f"forge-{name}"))
        assert [k for k, _ in fields] == keys, fields
        assert unquote(dict(fields)["path"]) == path
    line = server.access("forge-method")
    assert len(line) < 600 and dict(parse_logfmt(line))["method"] == "A" * 256 + "..."
    assert not [x for x in server.lines() if "id=fake" in x.split("request ", 1)[-1][:8]]
    assert not [x for x in server.lines() if x.startswith("2026-01-01")]
    wanted = {("handler", "/healthz"), ("method", "other"), ("status", "405")}
    counted = [
        count
        for (name, labels), count in metrics(server).items()
        if name == "unetpp_requests_total" and wanted <= set(labels)
    ]
    assert sum(counted) >= 1  # the 8 KB method is the label `other`


def v2_post(server: Server, name: str, content: bytes, headers: dict) -> httpx.Response:
    url = f"{server.url}/v2/models/{name}/infer"
    return httpx.post(url, content=content, headers=headers, timeout=60)


def test_v2_bodies_and_headers_are_bounded_4xx(server, tiny_repository):
    name = model_name(tiny_repository)
    good = {"name": "image", "datatype": "UINT8", "shape": [8, 8], "data": [0] * 64}
    amplified = json.dumps({"inputs": [good], "outputs": [{"name": "logits"}] * 3000})
    cases = {
        "3,000 copies of one output": (amplified.encode(), {}),
        "nested 5,000 deep": (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}),
        "a 5,001-digit number": (('{"inputs": [], "id": ' + "9" * 5001 + "}").encode(), {}),
    }
    body = json.dumps({"inputs": [good]}).encode()
    for length in (
        "\u00b2",
        "\u0661".encode().decode("latin-1"),
        "-1",
        "1e3",
        "0x10",
        "1 2",
        "9" * 40,
        "",
    ):
        cases[f"header length {length!r}"] = (body, {LENGTH: length.encode("latin-1")})
    rss = server.rss_mb()
    for case, (content, headers) in cases.items():
        r = v2_post(server, name, content, headers)
        assert r.status_code == 400, (case, r.status_code, r.text[:200])
        assert r.json()["error"].startswith("invalid_tensor: "), (case, r.text[:200])
        assert len(r.content) < 1000, case
    assert v2_post(server, name, body, {}).status_code == 200
    assert server.rss_mb() - rss < 100, (rss, server.rss_mb())
    assert not [line for line in server.lines() if "Traceback" in line]


def test_a_client_leaving_mid_upload_is_a_499_not_a_500(server):
    before = metrics(server)
    with server.connect() as s:
        s.sendall(
            b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\nX-Request-ID: leaver\r\n\r\n" + b"\x89PNG" * 250
        )
        time.sleep(0.3)
    line = server.access("leaver")
    assert " INFO unetpp.access: " in line and "status=499 error=client_disconnected" in line
    after = metrics(server)
    labels = {"handler": "/v1/segment", "status": "499", "error": "client_disconnected"}
    delta = value(after, "unetpp_request_errors_total", **labels) - value(
        before, "unetpp_request_errors_total", **labels
    )
    assert delta == 1
    assert not [x for x in server.lines() if "Traceback" in x or "internal_error" in x]


def test_repeated_query_parameters_are_a_422(server, tiny_repository):
    image = encode_png(synthetic(48, 48))
    png = {"content-type": "image/png"}
    r = httpx.post(f"{server.url}/v1/segment?level=1&level=4", content=image, headers=png)
    assert r.status_code == 422 and r.json()["error"] == "invalid_parameter", r.text
    assert "level" in r.json()["detail"]
    r = httpx.post(f"{server.url}/v1/segment?level=2", files={"image": ("a.png", image)})
    assert r.status_code == 200 and r.headers["x-unetpp-level"] == "2", r.text
    url = f"{server.url}/v2/models/{model_name(tiny_repository)}/infer?x=1&x=2"
    r = httpx.post(url, content=b"{}", timeout=30)
    assert r.status_code == 422 and r.json()["error"].startswith("invalid_parameter: x"), r.text


def test_admin_refuses_without_a_key_unless_opened(server):
    r = httpx.post(f"{server.url}/v1/admin/reload", timeout=30)
    assert r.status_code == 403 and r.json()["error"] == "admin_closed", r.text
    assert "UNETPP_API_KEY" in r.json()["detail"] and "UNETPP_ADMIN_OPEN" in r.json()["detail"]
    assert httpx.get(f"{server.url}/readyz").status_code == 200
