"""Bad requests get the right 4xx with a message saying what to fix, and the server still answers after each;
the token is required on every request when the server has one; binding beyond loopback needs a token."""

from __future__ import annotations

import json
import os
import time

import httpx
import numpy as np
import pytest
from serve_support import N_TINY, Server, tiny_surrogate

from layershap import Client
from layershap.cli.serve import is_loopback, serve
from layershap.core.errors import LayershapError
from layershap.serve.client import ServiceError
from layershap.surrogate.checkpoint import load_surrogate
from layershap.surrogate.registry import Registry

TINY = "tiny-synthetic"
TOKEN = "s3cret-token-0123456789abcdef"
JSON_BODY = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("safety")
    tiny = tiny_surrogate(base / "tiny")
    Registry(base / "registry").add(tiny)
    token_file = base / "token"
    token_file.write_text(TOKEN + "\n")
    srv = Server(base / "registry", token_file=token_file, max_exact_layers=10, max_budget=5000, max_masks=100,
                 max_body_mb=0.25)
    yield srv, load_surrogate(tiny)
    srv.stop()


def _client(srv, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=srv.url, headers=headers, timeout=60)


def _still_answers(srv) -> None:
    assert srv.alive()
    with _client(srv) as c:
        assert c.get("/v1/health").json()["status"] == "ok"


ONE = [[1] * N_TINY]
BAD_REQUESTS = [
    # (method, path, raw body or json, status, words the message must contain)
    ("POST", f"/v1/surrogates/{TINY}/predict", b'{"masks": [[1, 0', 400, "not valid JSON"),
    ("POST", f"/v1/surrogates/{TINY}/predict", b"\xff\xfe garbage", 400, "not valid JSON"),
    ("POST", f"/v1/surrogates/{TINY}/predict", b'{"masks": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     "nested too deeply"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": [[1, 0, 1]]}, 400, "8 decoder layers"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": [[1] * N_TINY, [1] * (N_TINY + 1)]}, 400, "mask 1 has 9"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": [["yes?"] * N_TINY]}, 422, "masks.0.0"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": []}, 422, "at least 1"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"mask": ONE}, 422, "mask: Extra inputs"),
    ("POST", f"/v1/surrogates/{TINY}/predict", [1, 2], 422, "valid dictionary"),
    ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": ONE * 101}, 400, "at most 100"),
    ("POST", "/v1/surrogates/no-such-model/predict", {"masks": ONE}, 404, "no surrogate 'no-such-model'"),
    ("GET", "/v1/surrogates/no-such-model", None, 404, "registry list"),
    ("GET", "/v1/surrogates/.hidden", None, 400, "invalid entry id"),
    ("GET", "/v1/surrogates/..%2F..%2Fetc", None, 404, "no route"),
    ("GET", "/v1/nothing-here", None, 404, "/docs"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "k", "k": 2}}, 422, "index"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "semivalue", "sizes": "3:99"}}, 400, "outside 1..8"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "semivalue", "sizes": "a:b"}}, 400, "A:B"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "shapley", "sizes": "1:2"}}, 422, "sizes"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"method": "mc", "budget": 10**7}, 400, "Monte Carlo cap"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"method": "magic"}, 422, "method"),
    ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "banzhaf"}, "method": "mc-permutation"}, 400,
     "Shapley value only"),
    ("POST", f"/v1/surrogates/{TINY}/removal-sets", {"k": 8}, 400, "choose 1 <= k <= 7"),
    ("POST", f"/v1/surrogates/{TINY}/removal-sets", {"k": 2, "depth_fraction": 0.2}, 422, "exactly one"),
    ("POST", f"/v1/surrogates/{TINY}/removal-sets", {"k": 2, "top": 1000}, 400, "top must be <= 50"),
    ("POST", f"/v1/surrogates/{TINY}/sparsities", b'{"target": NaN}', 422, "target"),
    ("POST", f"/v1/surrogates/{TINY}/sparsities", {"target": 1.5}, 422, "target"),
    ("POST", f"/v1/surrogates/{TINY}/sparsities", {}, 422, "target: Field required"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD_REQUESTS)
def test_bad_request_gets_4xx_and_server_still_answers(server, method, path, body, status, words):
    srv, _ = server
    with _client(srv) as c:
        kwargs = ({"content": body, "headers": JSON_BODY} if isinstance(body, bytes) else
                  {"json": body} if body is not None else {})
        resp = c.request(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
    _still_answers(srv)


def test_oversized_bodies_are_refused(server):
    srv, _ = server
    big = b'{"masks": [' + b",".join([b"[1,1,1,1,1,1,1,1]"] * 20_000) + b"]}"  # ~360 kB > 0.25 MiB
    with _client(srv) as c:
        resp = c.post(f"/v1/surrogates/{TINY}/predict", content=big, headers=JSON_BODY)
        assert resp.status_code == 413 and "limit of 262,144 bytes" in resp.json()["error"]
        chunked = c.post(f"/v1/surrogates/{TINY}/predict", headers=JSON_BODY,
                         content=iter([big[i:i + 4096] for i in range(0, len(big), 4096)]))
        assert chunked.status_code == 413  # no Content-Length: counted while read
    _still_answers(srv)


def test_token_is_checked_on_every_request(server):
    srv, sur = server
    for path in ("/v1/health", "/v1/surrogates", f"/v1/surrogates/{TINY}", "/docs", "/openapi.json"):
        with _client(srv, token=None) as c:
            resp = c.get(path)
            assert resp.status_code == 401 and "Authorization: Bearer" in resp.json()["error"]
        with _client(srv, token="wrong-token-0123456789") as c:
            assert c.get(path).status_code == 403
        with _client(srv) as c:
            assert c.get(path).status_code == 200
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Basic {TOKEN}"}) as c:
        assert c.get("/v1/health").status_code == 403
    with _client(srv, token=None) as c:
        assert c.post(f"/v1/surrogates/{TINY}/predict", json={"masks": [[1] * N_TINY]}).status_code == 401
    with Client(srv.url, token=TOKEN) as client:
        masks = np.eye(N_TINY, dtype=bool) | np.eye(N_TINY, k=1, dtype=bool)
        nll, _std = client.predict(TINY, masks)
        np.testing.assert_allclose(nll, sur.predict_nll(masks), rtol=1e-12)
    with Client(srv.url) as client, pytest.raises(ServiceError, match="401"):
        client.health()
    _still_answers(srv)


def test_non_loopback_needs_a_token(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(LayershapError, match="--token-file"):
        serve(registry=tmp_path, host="0.0.0.0", port=0)
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(LayershapError, match="at least 16"):
        serve(registry=tmp_path, host="0.0.0.0", port=0, token_file=short)
    with pytest.raises(LayershapError, match="cannot read --token-file"):
        serve(registry=tmp_path, token_file=tmp_path / "absent")


def test_accepted_connections_have_nagle_off():
    """Keep-alive answers must not wait ~40 ms for a delayed ACK: asyncio sets TCP_NODELAY on the sockets it
    accepts only when the listening socket's proto is IPPROTO_TCP, which `bind` ensures."""
    import asyncio
    import socket

    from layershap.cli.serve import bind

    sock = bind("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    flags = []

    async def main() -> None:
        def handle(reader, writer) -> None:
            flags.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        for _ in range(100):
            if flags:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        await server.wait_closed()

    busy = bind("127.0.0.1", 0)
    with pytest.raises(LayershapError, match="cannot bind"):
        bind("127.0.0.1", busy.getsockname()[1])  # a port in use: refused with a message, not a traceback
    busy.close()
    asyncio.run(main())
    assert flags == [1]


# ---------------------------------------------------------------- a token-less loopback server, as `layershap serve`
SECRET = "secret detail /home/someone/private-notes.txt"
FAULT = ("import layershap.serve.app as _app\n"
         "def _fault(*args, **kwargs):\n"
         f"    raise RuntimeError({SECRET!r})\n"
         "_app.resolve_index = _fault  # GET /v1/surrogates/{id} fails unexpectedly on this server")


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("open")
    tiny = tiny_surrogate(base / "tiny")
    reg = Registry(base / "registry")
    reg.add(tiny)
    reg.add(tiny, name="victim")
    srv = Server(base / "registry", preamble=FAULT)
    yield srv, base / "registry"
    srv.stop()


def _port(srv) -> str:
    return srv.url.rsplit(":", 1)[1]


PREDICT = f"/v1/surrogates/{TINY}/predict"
ONE_JSON = b'{"masks": [[1, 1, 1, 1, 1, 1, 1, 1]]}'


@pytest.mark.parametrize("content_type,body", [
    ("text/plain", ONE_JSON),  # a cross-origin "simple" POST from any web page
    ("text/plain;charset=UTF-8", ONE_JSON),
    ("application/x-www-form-urlencoded", ONE_JSON),  # what `curl -d` sends without -H
    ("multipart/form-data; boundary=x", b"--x\r\n\r\n" + ONE_JSON + b"\r\n--x--"),
    (None, ONE_JSON),
    (None, b""),
    ("application/jsonp", ONE_JSON),
])
def test_post_bodies_must_be_declared_json(open_server, content_type, body):
    srv, _ = open_server
    headers = {} if content_type is None else {"Content-Type": content_type}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        resp = c.post(PREDICT, content=body, headers=headers)
        assert resp.status_code == 415, resp.text
        assert "Content-Type: application/json" in resp.json()["error"]
        assert resp.headers["accept"] == "application/json"
        for ok in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            assert c.post(PREDICT, content=ONE_JSON, headers={"Content-Type": ok}).status_code == 200
    _still_answers_open(srv)


def test_a_token_server_also_wants_json(server):
    srv, _ = server
    with _client(srv) as c:
        resp = c.post(PREDICT, content=ONE_JSON, headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415
    _still_answers(srv)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", "localhost.:{port}",
                                  "0.0.0.0:{port}", "[::2]:{port}", "192.168.1.5", "", "localhost:{port}@evil.example"])
def test_a_loopback_server_answers_only_loopback_host_names(open_server, host):
    srv, _ = open_server
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for method, path, kwargs in (("GET", "/v1/health", {}), ("GET", "/docs", {}),
                                     ("POST", PREDICT, {"json": {"masks": ONE}})):
            resp = c.request(method, path, headers={"Host": host.format(port=_port(srv))}, **kwargs)
            assert resp.status_code == 421, resp.text  # a DNS-rebinding page sends its own name as Host
            assert "bound to loopback" in resp.json()["error"]
    _still_answers_open(srv)


def test_loopback_host_names_are_answered(open_server, server):
    for srv, token in ((open_server[0], None), (server[0], TOKEN)):
        port = _port(srv)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", "localhost", f"127.8.9.10:{port}",
                     f"[::1]:{port}", "[::1]"):
            with _client(srv, token) as c:
                assert c.get("/v1/health", headers={"Host": host}).status_code == 200, host
                assert c.post(PREDICT, json={"masks": ONE}, headers={"Host": host}).status_code == 200, host


def _still_answers_open(srv) -> None:
    assert srv.alive()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/v1/health").json()["status"] == "ok"


def test_an_unexpected_error_gets_a_request_id_and_no_details(open_server):
    srv, _ = open_server
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        resp = c.get(f"/v1/surrogates/{TINY}")
    assert resp.status_code == 500
    message = resp.json()["error"]
    rid = resp.headers["x-request-id"]
    assert f"request id {rid}" in message and len(rid) == 12
    for leak in ("secret", "private-notes", "RuntimeError", "/home", "Traceback"):
        assert leak not in resp.text
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(rid in line for line in srv.output):
        time.sleep(0.05)
    time.sleep(0.2)  # the rest of the traceback
    log = "".join(srv.output)
    assert f"internal error {rid} on GET /v1/surrogates/{TINY}" in log
    assert f"RuntimeError: {SECRET}" in log and "Traceback" in log
    assert log.count(f"RuntimeError: {SECRET}") == 1  # logged once, with its id (not again by uvicorn)
    _still_answers_open(srv)


def test_an_altered_entry_is_reported_corrupt_by_a_running_server(open_server):
    srv, root = open_server
    member = root / "llama" / "victim" / "surrogate" / "member_0.pt"
    settle = member.stat().st_ctime_ns / 1e9 + 2.2 - time.time()  # older than the racy window: cacheable
    time.sleep(max(0.0, settle))
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for _ in range(3):
            listed = {e["id"]: e["status"] for e in c.get("/v1/surrogates").json()["surrogates"]}
            assert listed["victim"] == "ok" and c.get("/v1/health").json()["corrupt"] == 0
        st = member.stat()
        data = bytearray(member.read_bytes())
        data[len(data) // 2] ^= 0xFF
        member.write_bytes(bytes(data))
        os.utime(member, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime differs
        listed = {e["id"]: e for e in c.get("/v1/surrogates").json()["surrogates"]}
        assert listed["victim"]["status"] == "corrupt" and "does not match" in listed["victim"]["reason"]
        assert listed[TINY]["status"] == "ok" and c.get("/v1/health").json()["corrupt"] == 1
        resp = c.post("/v1/surrogates/victim/predict", json={"masks": ONE})
        assert resp.status_code == 409 and "corrupt" in resp.json()["error"]
    _still_answers_open(srv)


# ---------------------------------------------------------------- the guard alone (ASGI calls, no network)
def _asgi(app, method: str = "GET", path: str = "/", headers: dict | None = None) -> tuple[int, dict, list]:
    """One request through an ASGI app: status, response headers, and the messages sent."""
    import asyncio

    sent: list = []
    scope = {"type": "http", "method": method, "path": path, "headers": [
        (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, sent


async def _ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_guard_checks_the_host_only_when_bound_to_loopback():
    from layershap.serve.guard import Guard

    tokened = {"Host": "models.example.org:8000", "Authorization": f"Bearer {TOKEN}"}
    assert _asgi(Guard(_ok_app, TOKEN, 1000, loopback_hosts=False), headers=tokened)[0] == 200  # as before
    assert _asgi(Guard(_ok_app, TOKEN, 1000, loopback_hosts=True), headers=tokened)[0] == 421
    assert _asgi(Guard(_ok_app, None, 1000, loopback_hosts=True), headers={"Host": "127.0.0.1:1"})[0] == 200


def test_serve_turns_the_host_check_on_for_loopback_only(tmp_path, monkeypatch):
    """`layershap serve --host H` wires loopback_hosts = (H is loopback); nothing is bound beyond loopback here."""
    import socket

    import torch
    import uvicorn

    import layershap.cli.serve as cli_serve

    apps = []
    monkeypatch.setattr(cli_serve, "bind", lambda host, port: socket.socket())
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: apps.append(self.config.app))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    threads = torch.get_num_threads()
    try:
        for host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.5"):
            serve(registry=tmp_path, host=host, port=0, token_file=token_file)
    finally:
        torch.set_num_threads(threads)
    assert [app.loopback_hosts for app in apps] == [True, True, True, False, False]


def test_guard_answers_an_escaped_exception_with_a_request_id(caplog):
    from layershap.serve.guard import Guard

    async def failing(scope, receive, send):
        raise ValueError(SECRET)

    async def failing_midway(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ValueError("half sent")

    with caplog.at_level("ERROR", logger="layershap.serve"):
        status, headers, sent = _asgi(Guard(failing, None, 1000), headers={"Host": "localhost"})
    body = json.loads(b"".join(m.get("body", b"") for m in sent))
    assert status == 500 and f"request id {headers['x-request-id']}" in body["error"] and "secret" not in body["error"]
    record = next(r for r in caplog.records if headers["x-request-id"] in r.getMessage())
    assert record.exc_info and str(record.exc_info[1]) == SECRET
    with pytest.raises(ValueError, match="half sent"):  # half an answer out: the server must drop the connection
        _asgi(Guard(failing_midway, None, 1000), headers={"Host": "localhost"})
