"""Benchmark: machine instructions per proxied request, counted by valgrind's callgrind.

``bench/gateway.py`` measures throughput and CPU time, which other load on a shared
2-core machine moves by ±10 % between runs: too coarse to see a change worth a few
percent. Instructions executed are not moved by the machine's load at all (callgrind
counts them in a simulated CPU, whatever else runs), so this is the before/after figure
for work on the serving path; wall-clock and CPU figures stay ``bench/gateway.py``'s.

One simulator (``--time-scale 0``) serves every target; each target runs under
``valgrind --tool=callgrind`` with counting off while it starts. Per target: ``--warmup``
requests, then counting on for ``--requests`` whole answers (chat completions, the same
body as ``bench/gateway.py``), counting off, and the same for streamed answers. The
figure is user-space instructions of the target's process ÷ requests (the kernel's work,
the same for every target, is not counted).

Targets: ``synapse`` (this tree; the control plane as ``bench/gateway.py`` configures it:
one tenant, cache off, one worker), ``tree:<name>`` for each ``--baseline-tree DIR`` (the
same config, the code in DIR: a before/after in one run), and ``python_floor``
(``bench/python_floor.py``: what proxying costs in Python before any feature), unless
``--no-floor``. A target runs about 50 times slower under valgrind; a run of the
defaults takes a few minutes. Needs ``valgrind`` (Debian package) on PATH.

Run: ``python bench/hot_path_instructions.py [--baseline-tree DIR]``. Last line: ``{"bench":
"hot_path_instructions", "requests": …, "instructions_per_request": {"synapse": …, …},
"instructions_per_stream_request": {…}, "vs_first_baseline": {…}}``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import gateway  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

CONNECTIONS = 4     # keep-alive client connections, each sending its share in turn


def drive(port: int, n: int, stream: bool, headers: dict[str, str]) -> int:
    """Send ``n`` chat completions over ``CONNECTIONS`` connections; the count that did
    not answer 200."""
    failed = [0]

    def one_connection(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for i in range(k, n, CONNECTIONS):
            conn.request("POST", "/v1/chat/completions", gateway.body(i, stream),
                         {**headers, "Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failed[0] += 1
        conn.close()

    threads = [threading.Thread(target=one_connection, args=(k,)) for k in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed[0]


def callgrind(pid: int, command: str) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def counted(out: pathlib.Path, pid: int) -> int:
    """Instructions of the last dump of process ``pid`` (callgrind numbers its dumps)."""
    dumps = sorted(out.parent.glob(f"{out.name}.{pid}.*"),
                   key=lambda p: int(p.name.rsplit(".", 1)[1]))
    if not dumps:
        raise SystemExit(f"callgrind wrote no dump for {pid} in {out.parent}")
    for line in dumps[-1].read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {dumps[-1]}")


def measure(name: str, pid: int, port: int, out: pathlib.Path, args: argparse.Namespace,
            headers: dict[str, str]) -> tuple[float, float]:
    """Instructions per whole and per streamed request of the target ``pid``."""
    per: list[float] = []
    for stream in (False, True):
        if drive(port, args.warmup, stream, headers):
            raise SystemExit(f"{name}: warm-up requests failed")
        callgrind(pid, "--instr=on")
        failed = drive(port, args.requests, stream, headers)
        callgrind(pid, "--instr=off")
        callgrind(pid, "--dump")
        time.sleep(0.5)
        if failed:
            raise SystemExit(f"{name}: {failed} of {args.requests} requests failed")
        per.append(counted(out, pid) / args.requests)
    print(f"{name:<24} {per[0]:>12,.0f} {per[1]:>14,.0f}", flush=True)
    return per[0], per[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="counted, per phase")
    parser.add_argument("--warmup", type=int, default=100, help="per phase, not counted")
    parser.add_argument("--baseline-tree", type=pathlib.Path, metavar="DIR", action="append",
                        default=[], help="also count a control plane running the code in "
                        "DIR (target 'tree:<DIR name>'); repeatable")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="leave out bench/python_floor.py")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    tree = gateway.Tree(workdir)
    rows: dict[str, tuple[float, float]] = {}
    try:
        sp = free_port()
        sim = f"http://127.0.0.1:{sp}"
        tree.start("simulator", [str(gateway.BIN / "synapse"), "simulator", "--port", str(sp),
                                 "--time-scale", "0", "--served-model-name", gateway.MODEL,
                                 "--log-level", "warning"], f"{sim}/health")
        targets: list[tuple[str, list[str], dict[str, str], str, dict[str, str]]] = []
        auth = {"Authorization": f"Bearer {gateway.KEY}"}
        for label, code in [("synapse", None), *((gateway.tree_target(t), t.resolve())
                                                 for t in args.baseline_tree)]:
            hp = free_port()
            cfg = gateway.controlplane_config(workdir, sim, hp, free_port(),
                                              name=label.replace(":", "-"))
            targets.append((label, [str(gateway.BIN / "python"), str(gateway.BIN / "synapse"),
                                    "controlplane", "--config", cfg],
                            {"PYTHONPATH": str(code)} if code else {},
                            f"http://127.0.0.1:{hp}", auth))
        if args.floor:
            fp = free_port()
            targets.append(("python_floor", [str(gateway.BIN / "python"),
                                             str(REPO / "bench" / "python_floor.py"), str(fp),
                                             sim], {}, f"http://127.0.0.1:{fp}", {}))
        print(f"{'target':<24} {'instr/request':>12} {'instr/streamed':>14}   "
              f"({args.requests} requests each, callgrind)", flush=True)
        for label, argv, env, base, headers in targets:
            out = workdir / f"callgrind-{label.replace(':', '-')}"
            proc = tree.start(label, ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                      f"--callgrind-out-file={out}.%p", *argv],
                              f"{base}/health", env=env, timeout=900.0)
            rows[label] = measure(label, proc.pid, int(base.rsplit(":", 1)[1]), out, args,
                                  headers)
    finally:
        tree.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    first = next((gateway.tree_target(t) for t in args.baseline_tree), None)
    print(json.dumps({
        "bench": "hot_path_instructions", "requests": args.requests,
        "instructions_per_request": {k: round(v[0]) for k, v in rows.items()},
        "instructions_per_stream_request": {k: round(v[1]) for k, v in rows.items()},
        "vs_first_baseline": ({k: {"whole": round(v[0] / rows[first][0], 3),
                                   "streamed": round(v[1] / rows[first][1], 3)}
                               for k, v in rows.items()} if first in rows else {}),
    }))


if __name__ == "__main__":
    main()
