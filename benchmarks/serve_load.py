"""Load benchmark of `layershap serve` on loopback with the committed 18-layer Gemma-3-270M surrogate.

Starts the server as a subprocess (empty registry: only the built-in entry) and measures
  * startup to first answer: process start -> first successful predict on the built-in entry;
  * predict: N requests of one random mask each from C concurrent clients (own keep-alive connection each):
    p50 / p99 latency, throughput, errors (non-200 answers) and dropped requests (no answer at all);
  * predict of N masks in one request (latency of the batch);
  * a cached scores query (the default index, exact, computed once first): p50 / p99 from one client and from
    C concurrent clients;
and prints them beside the targets. Bounded: N requests, a deadline per phase, loopback only.

Example:
    $ .venv/bin/python benchmarks/serve_load.py                       # 1,000 requests, 32 clients
    $ .venv/bin/python benchmarks/serve_load.py --requests 200 --clients 8
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from layershap.serve.client import no_delay_transport

ENTRY = "gemma-3-270m"
N_LAYERS = 18
TARGETS = {"predict_p99_ms": 50.0, "scores_cached_p99_ms": 10.0, "startup_s": 3.0}


def start_server(registry: str) -> tuple[subprocess.Popen, str, float]:
    """Start `layershap serve --port 0`; returns the process, its URL and the start time (perf_counter)."""
    code = ("import sys; from layershap.cli.serve import serve; "
            f"sys.exit(serve(registry={registry!r}, port=0))")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line}{proc.stdout.read()}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, line.split("listening on ")[1].split()[0], started


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def import_torch_seconds() -> float:
    """Wall time of `python -c "import torch"` now: the floor under any startup of a torch-based server."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - t0


def run_load(url: str, bodies: list[dict], path: str, clients: int, deadline_s: float, pid: int) -> dict:
    """POST every body to ``path`` from ``clients`` threads, each with its own keep-alive connection (stdlib
    http.client: a lean load generator, so that the clients leave the shared CPUs to the server); latencies in ms."""
    local = threading.local()
    host, port = url.split("//")[1].rsplit(":", 1)
    stop_at = time.perf_counter() + deadline_s

    def one(body: dict) -> tuple[float, int | None]:
        if time.perf_counter() > stop_at:
            return float("nan"), None
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(host, port, timeout=30)
            local.conn.connect()
            local.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = json.dumps(body).encode()
        t0 = time.perf_counter()
        try:
            local.conn.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
            resp = local.conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            status = None
            local.conn.close()
            del local.conn
        return (time.perf_counter() - t0) * 1e3, status

    t0, server0, client0 = time.perf_counter(), cpu_seconds(pid), time.process_time()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    server_ms = (cpu_seconds(pid) - server0) * 1e3 / len(bodies)
    client_ms = (time.process_time() - client0) * 1e3 / len(bodies)
    lat = np.array([r[0] for r in results if r[1] is not None])
    return {"n": len(bodies), "answered": len(lat), "errors": sum(r[1] not in (None, 200) for r in results),
            "dropped": sum(r[1] is None for r in results), "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "max": float(lat.max()), "throughput": len(lat) / wall,
            "wall": wall,
            "server_cpu_ms": server_ms, "client_cpu_ms": client_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="predict requests (default 1000)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--scores-requests", type=int, default=500, help="cached scores requests (default 500)")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds per phase at most (default 120)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    torch_s = import_torch_seconds()
    with tempfile.TemporaryDirectory() as registry:
        proc, url, started = start_server(registry)
        try:
            one_mask = {"masks": [[1] * N_LAYERS]}
            with httpx.Client(base_url=url, timeout=30, transport=no_delay_transport()) as c:
                while c.post(f"/v1/surrogates/{ENTRY}/predict", json=one_mask).status_code != 200:
                    time.sleep(0.01)
                startup = time.perf_counter() - started
                path = f"/v1/surrogates/{ENTRY}/predict"
                run_load(url, [one_mask] * 64, path, args.clients, args.deadline, proc.pid)  # warm-up: connections, threads
                bodies = [{"masks": (rng.random((1, N_LAYERS)) < 0.75).astype(int).tolist()}
                          for _ in range(args.requests)]
                predict = run_load(url, bodies, path, args.clients, args.deadline, proc.pid)
                batch = (rng.random((args.requests, N_LAYERS)) < 0.75).astype(int).tolist()
                t0 = time.perf_counter()
                assert c.post(path, json={"masks": batch}).status_code == 200
                batch_ms = (time.perf_counter() - t0) * 1e3
                t0 = time.perf_counter()
                scores_path = f"/v1/surrogates/{ENTRY}/scores"
                first = c.post(scores_path, json={})
                assert first.status_code == 200, first.text
                compute_s = time.perf_counter() - t0
            cached_1 = run_load(url, [{}] * args.scores_requests, scores_path, 1, args.deadline, proc.pid)
            cached_c = run_load(url, [{}] * args.scores_requests, scores_path, args.clients, args.deadline, proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=15)

    print(f"layershap serve load benchmark: {ENTRY} ({N_LAYERS} layers, 8 members), loopback, "
          f"{os.cpu_count()} CPUs shared by server and clients, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'measure':<68} {'measured':>12} {'target':>10}  ok")
    rows = [
        ("startup to first answer (s)", startup, TARGETS["startup_s"]),
        ("`python -c 'import torch'` alone, measured just before (s)", torch_s, None),
        (f"predict 1 mask x {predict['n']} req, {args.clients} clients: p50 (ms)", predict["p50"], None),
        (f"predict 1 mask x {predict['n']} req, {args.clients} clients: p99 (ms)", predict["p99"],
         TARGETS["predict_p99_ms"]),
        ("predict: throughput (requests/s)", predict["throughput"], None),
        ("predict: errors", predict["errors"], 0),
        ("predict: dropped", predict["dropped"] + predict["n"] - predict["answered"] - predict["dropped"], 0),
        ("predict: server CPU per request (ms)", predict["server_cpu_ms"], None),
        (f"predict: client CPU per request (ms, all {args.clients} client threads)", predict["client_cpu_ms"], None),
        ("predict: mean latency floor = clients x CPU per request / CPUs (ms)",
         args.clients * (predict["server_cpu_ms"] + predict["client_cpu_ms"]) / (os.cpu_count() or 1), None),
        (f"predict {args.requests} masks in one request (ms)", batch_ms, None),
        ("scores (exact, default index): first computation (s)", compute_s, None),
        ("scores cached, 1 client: p50 (ms)", cached_1["p50"], None),
        ("scores cached, 1 client: p99 (ms)", cached_1["p99"], TARGETS["scores_cached_p99_ms"]),
        ("scores cached: server CPU per request (ms)", cached_1["server_cpu_ms"], None),
        (f"scores cached, {args.clients} clients: p50 (ms)", cached_c["p50"], None),
        (f"scores cached, {args.clients} clients: p99 (ms)", cached_c["p99"], None),
        (f"scores cached, {args.clients} clients: throughput (req/s)", cached_c["throughput"], None),
        ("scores cached: errors + dropped", cached_1["errors"] + cached_1["dropped"] + cached_c["errors"]
         + cached_c["dropped"], 0),
    ]
    failed = 0
    for name, value, target in rows:
        ok = "" if target is None else ("yes" if value <= target else "NO")
        failed += ok == "NO"
        shown = f"{value:,.0f}" if isinstance(value, int) else f"{value:,.2f}"
        print(f"{name:<68} {shown:>12} {'' if target is None else f'{target:g}':>10}  {ok}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
