"""HTTP benchmark (issue 6): picloud's user routes against a bare starlette baseline.

    .venv/bin/python bench/http_bench.py [--duration 10] [--rounds 3] [--connections 8,32,64]

Not a test: prints figures for bench/RESULTS.md (## HTTP) and writes them as JSON
(``--json``). Traffic goes to 127.0.0.1 only, bounded by wrk's ``-d``.

- Installs ``wrk`` (Debian package) when it is missing (``apt-get``; needs root).
- Starts ONE embedded PostgreSQL in a temp dir under /tmp (the server settings
  ``picloud serve`` uses for its embedded database — durable defaults — plus
  ``max_connections=200`` so both servers' pools fit) with two databases:
  ``picloud_bench`` (migrated to head) and ``baseline_bench``.
- Baseline B: ``bench/http_baseline_app.py`` (starlette + uvicorn, uvloop, httptools,
  one process), ``POST /insert`` = one ``INSERT … RETURNING`` via SQLAlchemy Core,
  pool_size 20 / max_overflow 20 (what picloud's defaults give its engine).
- picloud: the real ``.venv/bin/picloud serve`` with ``PICLOUD_DB_POOL_SIZE=20``; an
  app ``bench`` with a no-op script (``return None`` → 204) on ``POST /noop`` (sync)
  and ``POST /noop-async`` (async, 202).
- Every target gets the same wrk load (same body ``{"n": 1}``, JSON), interleaved
  B, sync, async, B, sync, async, … per round; before every run the outbox is
  drained (``picloud_outbox_depth`` = 0 on ``/metrics``); after an async run the
  time the dispatcher needs to drain the backlog is measured.
- ``--held`` adds a last phase: every execution slot of the node is taken by a script
  that sleeps, so nothing else runs, and the async route is measured again beside B.
  That is the route's acceptance alone (HTTP, the event, the durable write), apart
  from the executions that a node otherwise runs in the same process meanwhile. The
  app's queue cap is raised to its maximum for it (the backlog is left unrun).
- ``--soak SECONDS`` runs instead a long load, sync and async in turns of
  ``--duration`` at the first ``--connections``, and prints after each turn its
  figures beside what the node has grown: the outbox and ``executions`` on disk and
  the resident memory of picloud's process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PICLOUD = BIN / "picloud"
NOOP = "def handle(event, ctx):\n    return None\n"
HOLD = "import time\ndef handle(event, ctx):\n    time.sleep(240)\n"
HOLD_TIMEOUT_S = 250
BODY = '{"n": 1}'
WRK_SCRIPT = (
    'wrk.method = "POST"\n'
    f"wrk.body = '{BODY}'\n"
    'wrk.headers["Content-Type"] = "application/json"\n'
)


# -- setup --------------------------------------------------------------------------


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: installing the Debian package", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, check=False).returncode:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("could not install wrk")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: server exited {proc.returncode}\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}: not ready in {timeout} s\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def setup_picloud_app(base: str, token: str) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
        app = c.post("/api/v1/admin/apps", json={"name": "bench"})
        app.raise_for_status()
        app_id = app.json()["id"]
        c.post(
            f"/api/v1/admin/apps/{app_id}/scripts", json={"name": "noop", "source": NOOP}
        ).raise_for_status()
        for path, mode in (("/noop", "sync"), ("/noop-async", "async")):
            c.post(
                f"/api/v1/admin/apps/{app_id}/routes",
                json={"method": "POST", "path": path, "script": "noop", "dispatch_mode": mode},
            ).raise_for_status()
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/apps/bench/noop", json={"n": 1})
        assert r.status_code == 204, (r.status_code, r.text)
        r = c.post("/apps/bench/noop-async", json={"n": 1})
        assert r.status_code == 202, (r.status_code, r.text)
    return {"app_id": app_id}


def gauge(base: str, name: str) -> int:
    """One unlabelled figure of the node's ``/metrics``."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    m = re.search(rf"^{name}\s+([0-9.e+]+)$", text, re.M)
    if m is None:
        raise RuntimeError(f"no {name} in /metrics")
    return int(float(m.group(1)))


def hold_every_slot(base: str, token: str, app_id: str) -> int:
    """Take every execution slot of the node with a script that sleeps (``HOLD``); return
    once a sync request is refused 503 for want of one (nothing else runs after that)."""
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
        c.post(
            f"/api/v1/admin/apps/{app_id}/scripts",
            json={"name": "hold", "source": HOLD, "timeout_seconds": HOLD_TIMEOUT_S},
        ).raise_for_status()
        c.post(
            f"/api/v1/admin/apps/{app_id}/routes",
            json={"method": "POST", "path": "/hold", "script": "hold", "dispatch_mode": "async"},
        ).raise_for_status()
    slots = gauge(base, "picloud_gate_capacity")
    with httpx.Client(base_url=base, timeout=30) as c:
        for _ in range(slots):
            assert c.post("/apps/bench/hold", json={"n": 1}).status_code == 202
        deadline = time.monotonic() + 60
        while c.post("/apps/bench/noop", json={"n": 1}).status_code != 503:
            if time.monotonic() > deadline:
                raise RuntimeError("the execution slots were not all taken in 60 s")
            time.sleep(0.2)
    return slots


def relation_sizes(url: str) -> dict[str, int]:
    """Bytes on disk of the outbox and the execution records (indexes and TOAST in)."""
    from sqlalchemy import create_engine, pool, text

    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT pg_total_relation_size('outbox'), pg_total_relation_size('executions')"
                )
            ).one()
    finally:
        engine.dispose()
    return {"outbox": int(row[0]), "executions": int(row[1])}


def tree_rss(root: int) -> int:
    """Resident bytes of a process tree (shared pages counted in each process)."""
    total = 0
    for pid in _tree(_procs(), root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total


def outbox_depth(base: str) -> int:
    return gauge(base, "picloud_outbox_depth")


def wait_outbox_empty(base: str, timeout: float = 600) -> float:
    """Seconds until the outbox is empty (polled every 50 ms)."""
    start = time.monotonic()
    while outbox_depth(base) > 0:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"outbox not drained in {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


# -- CPU accounting -------------------------------------------------------------------

_TCK = os.sysconf("SC_CLK_TCK")


def _procs() -> dict[int, tuple[int, float, int]]:
    """pid → (ppid, utime+stime seconds, uid) for every live process."""
    out: dict[int, tuple[int, float, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            uid = os.stat(f"/proc/{name}").st_uid
        except OSError:
            continue
        out[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TCK, uid)
    return out


def _tree(procs: dict[int, tuple[int, float, int]], root: int) -> set[int]:
    pids, grew = {root}, True
    while grew:
        grew = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in pids and pid not in pids:
                pids.add(pid)
                grew = True
    return pids


def cpu_snapshot(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each root's process tree (live processes only: the CPU of
    a PostgreSQL backend that exited in between is lost)."""
    procs = _procs()
    return {
        name: sum(procs[p][1] for p in _tree(procs, pid) if p in procs)
        for name, pid in roots.items()
    }


# -- wrk ----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", value)
    if m is None:
        raise ValueError(value)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for q in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)$", out, re.M)
        res[f"p{q}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M)
    res["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([0-9.]+)(\w+)", out)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)$", out, re.M)
    res["socket_errors"] = m.group(1).strip() if m else ""
    if res["requests"] and res["rps"]:
        res["ok_rps"] = res["rps"] * (res["requests"] - res["non_2xx"]) / res["requests"]
    else:
        res["ok_rps"] = res["rps"]
    return res


class Wrk:
    def __init__(self, wrk: str, workdir: Path) -> None:
        self.wrk = wrk
        self.script = workdir / "post.lua"
        self.script.write_text(WRK_SCRIPT)

    def run(self, url: str, connections: int, threads: int, duration: float) -> dict[str, Any]:
        cmd = [
            self.wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{int(duration)}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(self.script),
            url,
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, timeout=duration + 120
        ).stdout
        res = parse_wrk(out)
        res["cmd"] = " ".join(cmd[1:])
        res["wrk_output"] = out
        return res


# -- the benchmark --------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="8,32,64")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (c>1 runs)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the raw runs here")
    parser.add_argument(
        "--keep", action="store_true", help="leave servers up, print URLs and wait (profiling)"
    )
    parser.add_argument(
        "--held",
        action="store_true",
        help="last, the async route again beside B with every execution slot held "
        "(acceptance alone)",
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="SECONDS",
        help="instead of the rounds: this long a load, sync and async in turns",
    )
    parser.add_argument(
        "--picloud-env",
        action="append",
        default=[],
        help="extra NAME=VALUE for picloud serve (e.g. PICLOUD_MAX_CONCURRENT_EXECUTIONS=64)",
    )
    parser.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        help="extra PostgreSQL server setting NAME=VALUE (e.g. synchronous_commit=off)",
    )
    args = parser.parse_args()
    conns = [int(c) for c in args.connections.split(",") if c]

    wrk_bin = ensure_wrk()
    from picloud import migrations
    from picloud.cli import ensure_database
    from picloud.embedded_pg import EmbeddedPostgres

    work = Path(tempfile.mkdtemp(prefix="picloud-httpbench-", dir="/tmp"))
    os.chmod(work, 0o755)
    pg_settings = {"max_connections": "200"}
    for item in args.pg_setting:
        name, _, value = item.partition("=")
        pg_settings[name] = value
    pg = EmbeddedPostgres(work / "pg", settings=pg_settings)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pg.start()
        ensure_database(pg.url("postgres"), "picloud_bench")
        ensure_database(pg.url("postgres"), "baseline_bench")
        pc_url, b_url = pg.url("picloud_bench"), pg.url("baseline_bench")
        migrations.upgrade(pc_url)

        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
        b_port, pc_port = free_port(), free_port()
        b_log, pc_log = work / "baseline.log", work / "picloud.log"
        with b_log.open("ab") as f:
            b_proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "bench" / "http_baseline_app.py"),
                    "--database-url",
                    b_url,
                    "--port",
                    str(b_port),
                    "--pool-size",
                    "20",
                    "--max-overflow",
                    "20",
                ],
                cwd=ROOT,
                env=clean_env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        procs.append(b_proc)
        token = "pc_bench_" + os.urandom(16).hex()
        pc_env = {
            **clean_env,
            "PICLOUD_DATABASE_URL": pc_url,
            "PICLOUD_ADMIN_TOKEN": token,
            "PICLOUD_PORT": str(pc_port),
            "PICLOUD_HOST": "127.0.0.1",
            "PICLOUD_DB_POOL_SIZE": "20",
        }
        if args.held:  # the held phase's backlog stays queued: let it grow
            pc_env["PICLOUD_MAX_QUEUED_EXECUTIONS_PER_APP"] = "10000000"
        for item in args.picloud_env:
            name, _, value = item.partition("=")
            pc_env[name] = value
        with pc_log.open("ab") as f:
            pc_proc = subprocess.Popen(
                [str(PICLOUD), "serve"], cwd=ROOT, env=pc_env, stdout=f, stderr=subprocess.STDOUT
            )
        procs.append(pc_proc)
        b_base, pc_base = f"http://127.0.0.1:{b_port}", f"http://127.0.0.1:{pc_port}"
        wait_ready(f"{b_base}/readyz", b_proc, b_log)
        wait_ready(f"{pc_base}/readyz", pc_proc, pc_log)
        app_id = setup_picloud_app(pc_base, token)["app_id"]
        r = httpx.post(f"{b_base}/insert", json={"n": 1})
        assert r.status_code == 200, r.text
        print(f"baseline pid {b_proc.pid} {b_base}; picloud pid {pc_proc.pid} {pc_base}")
        print(
            f"work dir {work}; PostgreSQL settings {pg_settings}; "
            f"picloud env extras {args.picloud_env}"
        )

        targets = {
            "B": f"{b_base}/insert",
            "sync": f"{pc_base}/apps/bench/noop",
            "async": f"{pc_base}/apps/bench/noop-async",
        }
        if args.keep:
            for name, url in targets.items():
                print(f"{name}: {url}")
            # Started in the background by a shell, this process ignores SIGINT: take it
            # (and SIGTERM) back, so either one stops the servers and PostgreSQL.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            print("--keep: Ctrl-C or SIGTERM to stop", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0

        w = Wrk(wrk_bin, work)
        for url in targets.values():  # warm-up: workers, pools, caches
            w.run(url, 8, 1 if args.threads == 1 else args.threads, args.warmup)
            wait_outbox_empty(pc_base)

        runs: list[dict[str, Any]] = []
        postmaster = int((work / "pg" / "postmaster.pid").read_text().split()[0])
        roots = {"picloud": pc_proc.pid, "B": b_proc.pid, "postgres": postmaster}

        held = False  # the last phase: the outbox is left to grow, nothing is drained

        def one(name: str, c: int, threads: int) -> None:
            pre_drain = 0.0 if held else wait_outbox_empty(pc_base)
            before = cpu_snapshot(roots)
            res = w.run(targets[name], c, threads, args.duration)
            res.update(target=f"{name} held" if held else name, connections=c)
            res["pre_drain_s"] = pre_drain
            if name == "async" and not held:
                res["drain_s"] = wait_outbox_empty(pc_base)
            after = cpu_snapshot(roots)
            if res["requests"]:
                # CPU ms per request (async: including the drain), by process tree
                res["cpu_ms"] = {
                    k: round(1000 * (after[k] - before[k]) / res["requests"], 3) for k in after
                }
            if name == "async" and not held:
                # end-to-end: accepted requests executed per second of (load + drain)
                res["e2e_rps"] = (res["requests"] - res["non_2xx"]) / (
                    args.duration + res["drain_s"]
                )
            runs.append(res)
            extra = f" drain {res['drain_s']:.2f}s" if "drain_s" in res else ""
            print(
                f"  c={c:<3} {name:<5} {res['rps']:8.1f} req/s  ok {res['ok_rps']:8.1f}  "
                f"p50 {fmt(res['p50_ms'])} ms  p99 {fmt(res['p99_ms'])} ms  "
                f"non2xx {res['non_2xx']} {res['socket_errors']}{extra} "
                f"cpu ms/req {res.get('cpu_ms')}",
                flush=True,
            )

        if args.soak:
            soak(w, targets, pc_url, pc_proc.pid, pc_base, conns[0], args)
            return 0

        for c in conns:
            print(f"throughput, {c} connections, {args.threads} wrk threads, {args.duration}s")
            for _ in range(args.rounds):
                for name in ("B", "sync", "async"):
                    one(name, c, min(args.threads, c))
        print(f"latency, 1 connection, 1 wrk thread, {args.duration}s")
        for _ in range(args.rounds):
            for name in ("B", "sync", "async"):
                one(name, 1, 1)

        if args.held:
            slots = hold_every_slot(pc_base, token, app_id)
            held = True
            c = conns[0]
            print(f"held: {slots} execution slots sleeping; {c} connections, {args.duration}s")
            for _ in range(args.rounds):
                for name in ("B", "async"):
                    one(name, c, min(args.threads, c))

        if args.json:
            args.json.write_text(json.dumps(runs, indent=1))
        summarize(runs, list(dict.fromkeys([*conns, 1])))  # 1 once, if asked for too
        if args.held:
            summarize(runs, [conns[0]], names=("B held", "async held"))
        return 0
    finally:
        for p in reversed(procs):
            stop(p)
        pg.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def soak(
    w: Wrk,
    targets: dict[str, str],
    pc_url: str,
    pc_pid: int,
    pc_base: str,
    c: int,
    args: argparse.Namespace,
) -> None:
    """Sync and async in turns for ``args.soak`` seconds; a line per turn."""
    print(f"soak: {args.soak}s, {c} connections, turns of {args.duration}s")
    start = time.monotonic()
    turn = 0
    while time.monotonic() - start < args.soak:
        name = ("sync", "async")[turn % 2]
        turn += 1
        res = w.run(targets[name], c, min(args.threads, c), args.duration)
        depth = outbox_depth(pc_base)
        sizes = relation_sizes(pc_url)
        print(
            f"  t={time.monotonic() - start:6.0f}s {name:<5} {res['ok_rps']:8.1f} req/s  "
            f"p50 {fmt(res['p50_ms'])} ms  p99 {fmt(res['p99_ms'])} ms  "
            f"non2xx {res['non_2xx']}  outbox depth {depth}  "
            f"outbox {sizes['outbox'] / 2**20:.1f} MiB  "
            f"executions {sizes['executions'] / 2**20:.1f} MiB  "
            f"rss {tree_rss(pc_pid) / 2**20:.0f} MiB",
            flush=True,
        )


def summarize(
    runs: list[dict[str, Any]], conns: list[int], names: tuple[str, ...] = ("B", "sync", "async")
) -> None:
    print(
        "\n| conns | target | req/s (median) | 2xx req/s | p50 ms | p99 ms | non-2xx "
        "| ratio to B (2xx) | async drain s | async end-to-end req/s "
        "| CPU ms/req server | CPU ms/req postgres |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in conns:
        med: dict[str, dict[str, float | None]] = {}
        for name in names:
            rs = [r for r in runs if r["target"] == name and r["connections"] == c]
            if not rs:
                continue
            med[name] = {
                k: median([r.get(k) for r in rs])
                for k in ("rps", "ok_rps", "p50_ms", "p99_ms", "non_2xx", "drain_s", "e2e_rps")
            }
            for k in ("picloud", "B", "postgres"):
                med[name]["cpu_" + k] = median([r.get("cpu_ms", {}).get(k) for r in rs])
        b = med.get(names[0], {}).get("ok_rps")
        for name, m in med.items():
            ratio = m["ok_rps"] / b if b and m["ok_rps"] is not None else None
            print(
                f"| {c} | {name} | {fmt(m['rps'], '.0f')} | {fmt(m['ok_rps'], '.0f')} | "
                f"{fmt(m['p50_ms'])} | {fmt(m['p99_ms'])} | {fmt(m['non_2xx'], '.0f')} | "
                f"{fmt(ratio)} | {fmt(m['drain_s'])} | {fmt(m['e2e_rps'], '.0f')} | "
                f"{fmt(m['cpu_B'] if name.startswith('B') else m['cpu_picloud'])} | "
                f"{fmt(m['cpu_postgres'])} |"
            )
        if c == 1 and "B" in med and "sync" in med:
            added = [
                s["p50_ms"] - bb["p50_ms"]
                for bb, s in zip(
                    [r for r in runs if r["target"] == "B" and r["connections"] == 1],
                    [r for r in runs if r["target"] == "sync" and r["connections"] == 1],
                    strict=False,
                )
            ]
            print(
                f"\nadded latency at 1 connection (sync p50 - B p50): median of medians "
                f"{fmt((med['sync']['p50_ms'] or 0) - (med['B']['p50_ms'] or 0))} ms; "
                f"per round {[round(a, 2) for a in added]}"
            )


if __name__ == "__main__":
    sys.exit(main())
