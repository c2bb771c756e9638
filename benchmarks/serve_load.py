"""Load benchmark of `layershap serve` on loopback with the committed 18-layer Gemma-3-270M surrogate.

Starts one server per ``--workers`` setting (default 1 and 2 worker processes: the single-process server and
the forked workers, side by side in one run) as subprocesses (empty registry: only the built-in entry); the
predict phase runs in ``--rounds`` rounds that alternate between the servers, so that a change in the machine's
load falls on all of them alike. For each server it measures
  * startup to first answer: process start -> first successful predict on the built-in entry;
  * predict: R rounds of N requests of one random mask each from C concurrent clients (own keep-alive
    connection each): p50 / p99 latency over all rounds, throughput, errors (non-200 answers) and dropped
    requests (no answer at all), server CPU per request (all worker processes);
  * predict of N masks in one request (latency of the batch);
  * a cached scores query (the default index, exact, computed once first): p50 / p99 from one client and from
    C concurrent clients;
and prints them beside the targets, with the machine's load average (other processes compete for the same
cores: compare the columns, which saw the same load). Bounded: N requests, a deadline per phase, loopback only.

Example:
    $ .venv/bin/python benchmarks/serve_load.py                       # 3 x 1,000 requests, 32 clients, 1 vs 2 workers
    $ .venv/bin/python benchmarks/serve_load.py --requests 200 --clients 8 --workers 1,2,4
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


def start_server(registry: str, workers: int) -> tuple[subprocess.Popen, str, float]:
    """Start `layershap serve --port 0 --workers W`; returns the process, its URL and the start time."""
    code = ("import sys; from layershap.cli.serve import serve; "
            f"sys.exit(serve(registry={registry!r}, port=0, workers={workers}))")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line}{proc.stdout.read()}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, line.split("listening on ")[1].split()[0], started


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its (worker) children so far (Linux /proc)."""

    def stat(p: int | str) -> list[str]:
        with open(f"/proc/{p}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()

    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = stat(entry)
            except OSError:
                continue
            if int(entry) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
    return {"latencies": [r[0] for r in results if r[1] is not None], "n": len(bodies),
            "errors": sum(r[1] not in (None, 200) for r in results), "dropped": sum(r[1] is None for r in results),
            "wall": time.perf_counter() - t0, "server_cpu": cpu_seconds(pid) - server0,
            "client_cpu": time.process_time() - client0}


def summary(runs: list[dict]) -> dict:
    """Latency percentiles over the pooled rounds, throughput, errors and CPU per request of ``run_load`` runs."""
    lat = np.concatenate([r["latencies"] for r in runs])
    n = sum(r["n"] for r in runs)
    return {"n": n, "answered": len(lat), "errors": sum(r["errors"] for r in runs),
            "dropped": sum(r["dropped"] for r in runs), "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "max": float(lat.max()),
            "throughput": len(lat) / sum(r["wall"] for r in runs),
            "server_cpu_ms": sum(r["server_cpu"] for r in runs) * 1e3 / n,
            "client_cpu_ms": sum(r["client_cpu"] for r in runs) * 1e3 / n}


def first_answer(url: str) -> None:
    """Wait until the server answers a predict on the built-in entry."""
    with httpx.Client(base_url=url, timeout=30, transport=no_delay_transport()) as c:
        while True:
            try:
                if c.post(f"/v1/surrogates/{ENTRY}/predict", json={"masks": [[1] * N_LAYERS]}).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.01)


def measure(servers: dict[int, tuple], args: argparse.Namespace, rng: np.random.Generator) -> dict[int, dict]:
    """Every phase on every server (``servers``: workers -> process, URL, startup seconds); the predict rounds
    alternate between the servers."""
    path = f"/v1/surrogates/{ENTRY}/predict"
    one_mask = {"masks": [[1] * N_LAYERS]}
    out: dict[int, dict] = {w: {"startup": startup, "predict": []} for w, (_, _, startup) in servers.items()}
    for proc, url, _ in servers.values():  # warm-up: connections, threads, every worker's surrogate
        run_load(url, [one_mask] * 256, path, args.clients, args.deadline, proc.pid)
    for _ in range(args.rounds):
        bodies = [{"masks": (rng.random((1, N_LAYERS)) < 0.75).astype(int).tolist()} for _ in range(args.requests)]
        for workers, (proc, url, _) in servers.items():
            out[workers]["predict"].append(run_load(url, bodies, path, args.clients, args.deadline, proc.pid))
    batch = (rng.random((args.requests, N_LAYERS)) < 0.75).astype(int).tolist()
    scores_path = f"/v1/surrogates/{ENTRY}/scores"
    for workers, (proc, url, _) in servers.items():
        res = out[workers]
        with httpx.Client(base_url=url, timeout=120, transport=no_delay_transport()) as c:
            t0 = time.perf_counter()
            assert c.post(path, json={"masks": batch}).status_code == 200
            res["batch_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            first = c.post(scores_path, json={})
            assert first.status_code == 200, first.text
            res["compute_s"] = time.perf_counter() - t0
        # every worker computes (and then caches) the query once: warm them all before timing cached answers
        run_load(url, [{}] * 64, scores_path, args.clients, args.deadline, proc.pid)
        res["cached_1"] = summary([run_load(url, [{}] * args.scores_requests, scores_path, 1, args.deadline,
                                            proc.pid)])
        res["cached_c"] = summary([run_load(url, [{}] * args.scores_requests, scores_path, args.clients,
                                            args.deadline, proc.pid)])
        res["predict"] = summary(res["predict"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="predict requests per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="predict rounds, alternating servers (default 3)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--workers", default="1,2", help="worker processes of each server (default 1,2)")
    parser.add_argument("--scores-requests", type=int, default=500, help="cached scores requests (default 500)")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds per phase at most (default 120)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = [int(w) for w in args.workers.split(",")]

    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()[0]
    torch_s = import_torch_seconds()
    servers: dict[int, tuple] = {}
    with tempfile.TemporaryDirectory() as registry:
        try:
            for workers in settings:  # one at a time: each startup on its own
                proc, url, started = start_server(registry, workers)
                servers[workers] = (proc, url, None)
                first_answer(url)
                servers[workers] = (proc, url, time.perf_counter() - started)
            res = measure(servers, args, rng)
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    load_after = os.getloadavg()[0]

    print(f"layershap serve load benchmark: {ENTRY} ({N_LAYERS} layers, 8 members), loopback, {os.cpu_count()} CPUs "
          f"shared by servers, clients and every other process; load average {load_before:.1f} before, "
          f"{load_after:.1f} after; this process at nice {os.nice(0)}")
    heads = [f"workers={w}" for w in settings]
    print(f"{'measure':<66} " + " ".join(f"{h:>11}" for h in heads) + f" {'target':>7}  ok")
    p = {w: res[w]["predict"] for w in settings}
    c1 = {w: res[w]["cached_1"] for w in settings}
    cc = {w: res[w]["cached_c"] for w in settings}
    n_pred = p[settings[0]]["n"]
    rows = [
        ("startup to first answer (s)", {w: res[w]["startup"] for w in settings}, TARGETS["startup_s"]),
        ("`python -c 'import torch'` alone, measured just before (s)", dict.fromkeys(settings, torch_s), None),
        (f"predict 1 mask x {n_pred} req, {args.clients} clients: p50 (ms)", {w: p[w]["p50"] for w in settings}, None),
        (f"predict 1 mask x {n_pred} req, {args.clients} clients: p99 (ms)", {w: p[w]["p99"] for w in settings},
         TARGETS["predict_p99_ms"]),
        ("predict: max (ms)", {w: p[w]["max"] for w in settings}, None),
        ("predict: throughput (requests/s)", {w: p[w]["throughput"] for w in settings}, None),
        ("predict: errors", {w: p[w]["errors"] for w in settings}, 0),
        ("predict: dropped", {w: p[w]["dropped"] + p[w]["n"] - p[w]["answered"] - p[w]["dropped"]
                              for w in settings}, 0),
        ("predict: server CPU per request, all workers (ms)", {w: p[w]["server_cpu_ms"] for w in settings}, None),
        (f"predict: client CPU per request (ms, all {args.clients} client threads)",
         {w: p[w]["client_cpu_ms"] for w in settings}, None),
        (f"predict {args.requests} masks in one request (ms)", {w: res[w]["batch_ms"] for w in settings}, None),
        ("scores (exact, default index): first computation (s)", {w: res[w]["compute_s"] for w in settings}, None),
        ("scores cached, 1 client: p50 (ms)", {w: c1[w]["p50"] for w in settings}, None),
        ("scores cached, 1 client: p99 (ms)", {w: c1[w]["p99"] for w in settings}, TARGETS["scores_cached_p99_ms"]),
        ("scores cached: server CPU per request (ms)", {w: c1[w]["server_cpu_ms"] for w in settings}, None),
        (f"scores cached, {args.clients} clients: p50 (ms)", {w: cc[w]["p50"] for w in settings}, None),
        (f"scores cached, {args.clients} clients: p99 (ms)", {w: cc[w]["p99"] for w in settings}, None),
        (f"scores cached, {args.clients} clients: throughput (req/s)", {w: cc[w]["throughput"] for w in settings},
         None),
        ("scores cached: errors + dropped", {w: c1[w]["errors"] + c1[w]["dropped"] + cc[w]["errors"]
                                             + cc[w]["dropped"] for w in settings}, 0),
    ]
    failed = 0
    for name, values, target in rows:
        oks = [] if target is None else ["yes" if values[w] <= target else "NO" for w in settings]
        failed += "NO" in oks[-1:]  # the last setting is the recommended one
        shown = " ".join(f"{v:>11,.0f}" if isinstance(v, int) else f"{v:>11,.2f}" for v in values.values())
        print(f"{name:<66} {shown} {'' if target is None else f'{target:g}':>7}  {'/'.join(oks)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
