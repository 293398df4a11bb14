"""Plain HTTP through glb, nginx and HAProxy, and direct, in one run: requests/s and CPU per request.

One run starts, all on 127.0.0.1 and each stopped at the end:

- the backend: nginx serving a static ``--size`` byte file (1 KiB by default);
- the proxies in front of it, each with keep-alive connections to the backend:
  nginx (``proxy_pass`` to an upstream with ``keepalive``), HAProxy (``http-reuse
  always``) when installed, and glb (``python -m glb`` with a temporary config);
- the load: ``wrk -t1 -c16`` with keep-alive, ``--seconds`` per target, against the
  backend directly, then each proxy.

Each proxy's CPU time is read from /proc (utime + stime of its processes) around
its phase and divided by the requests wrk completed. ``--glb-src DIR`` runs glb
from another checkout (a "before" run: ``git archive main | tar -x -C DIR``).

    python bench/http_bench.py                          # ~30 s
    python bench/http_bench.py --seconds 10 --glb-src /tmp/glb-main
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

from _common import (REPO, free_port, process_tree, stop, temp_dir, tree_cpu, wait_for_port, wait_quiet,
                     write_glb_config)

NGINX_TEMP = "".join(f"{name}_temp_path {{tmp}}/{name};\n" for name in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def nginx_conf(tmp, port, body):
    """An nginx config (one process) whose server block is ``body``."""
    temp = NGINX_TEMP.format(tmp=tmp)
    return textwrap.dedent(f"""\
        daemon off;
        master_process off;
        worker_processes 1;
        error_log {tmp}/error-{port}.log warn;
        pid {tmp}/nginx-{port}.pid;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            keepalive_requests 10000000;
            {temp}
            {body}
        }}
        """)


def start_nginx(tmp, port, body, deadline):
    path = os.path.join(tmp, f"nginx-{port}.conf")
    with open(path, "w") as f:
        f.write(nginx_conf(tmp, port, body))
    proc = subprocess.Popen(["nginx", "-c", path, "-p", tmp], stderr=subprocess.DEVNULL)
    wait_for_port(port, deadline, proc)
    return proc


def start_backend(tmp, size, deadline):
    www = os.path.join(tmp, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "bench"), "wb") as f:
        f.write(b"x" * size)
    port = free_port()
    body = f"server {{ listen 127.0.0.1:{port}; location / {{ root {www}; }} }}"
    return start_nginx(tmp, port, body, deadline), port


def start_nginx_proxy(tmp, backend_port, deadline):
    port = free_port()
    body = textwrap.dedent(f"""\
        upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
        server {{
            listen 127.0.0.1:{port};
            location / {{
                proxy_pass http://backend;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}""")
    return start_nginx(tmp, port, body, deadline), port


def start_haproxy(tmp, backend_port, deadline):
    port = free_port()
    path = os.path.join(tmp, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""\
            global
                nbthread 1
                maxconn 4096
            defaults
                mode http
                timeout connect 5s
                timeout client 30s
                timeout server 30s
                http-reuse always
            frontend fe
                bind 127.0.0.1:{port}
                default_backend be
            backend be
                server s1 127.0.0.1:{backend_port}
            """))
    proc = subprocess.Popen(["haproxy", "-f", path, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, deadline, proc)
    return proc, port


def start_glb(tmp, backend_port, src, deadline):
    port = free_port()
    config = write_glb_config(tmp, port, backend_port)
    env = dict(os.environ, PYTHONPATH=src)
    proc = subprocess.Popen([sys.executable, "-m", "glb", config], cwd=tmp, env=env)
    wait_for_port(port, deadline, proc)
    return proc, port


def wrk(port, seconds, connections):
    """(requests completed, elapsed seconds, errors) from wrk's report."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                          f"http://127.0.0.1:{port}/bench"],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not done:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    unit = {"ms": 0.001, "s": 1, "m": 60}[done.group(3)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    count = int(errors.group(1)) if errors else 0
    count += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return int(done.group(1)), float(done.group(2)) * unit, count


def measure(name, port, pids, seconds, connections):
    """One phase: warm up, then wrk while the proxy's CPU is read; a result row."""
    wrk(port, 1, 4)  # warm-up: imports, first pooled connections
    wait_quiet(pids)
    before = tree_cpu(pids)
    done, took, errors = wrk(port, seconds, connections)
    user, system = (a - b for a, b in zip(tree_cpu(pids), before))
    return {"name": name, "rps": done / took, "done": done, "errors": errors,
            "cpu_us": (user + system) / max(done, 1) * 1e6 if pids else None,
            "user_us": user / max(done, 1) * 1e6, "sys_us": system / max(done, 1) * 1e6}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5, help="length of each phase (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--size", type=int, default=1024, help="response body bytes (default 1024)")
    parser.add_argument("--glb-src", default=REPO, help="the checkout glb runs from (default: this one)")
    parser.add_argument("--deadline", type=float, default=180, help="whole run, seconds (default 180)")
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is not installed")
    deadline = time.monotonic() + args.deadline
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("bench: deadline passed"))
    signal.alarm(int(args.deadline) + 1)

    procs = []
    tmp = temp_dir("glb-http-bench-")
    try:
        backend, backend_port = start_backend(tmp, args.size, deadline)
        procs.append(backend)
        targets = [("direct (nginx static)", backend_port, [])]
        proxy, port = start_nginx_proxy(tmp, backend_port, deadline)
        procs.append(proxy)
        targets.append(("nginx proxy", port, process_tree(proxy.pid)))
        if shutil.which("haproxy"):
            proxy, port = start_haproxy(tmp, backend_port, deadline)
            procs.append(proxy)
            targets.append(("HAProxy", port, process_tree(proxy.pid)))
        proxy, port = start_glb(tmp, backend_port, os.path.abspath(args.glb_src), deadline)
        procs.append(proxy)
        targets.append(("glb", port, process_tree(proxy.pid)))

        print(f"wrk -t1 -c{args.connections} -d{args.seconds:g}s, keep-alive, {args.size} B static body, "
              f"cpus={os.cpu_count()}, glb from {os.path.abspath(args.glb_src)}")
        rows = [measure(name, port, pids, args.seconds, args.connections) for name, port, pids in targets]
        nginx_cpu = next(row["cpu_us"] for row in rows if row["name"] == "nginx proxy")
        nginx_rps = next(row["rps"] for row in rows if row["name"] == "nginx proxy")
        print(f"{'target':<24}{'req/s':>10}{'CPU us/req':>12}{'(user':>7}{'+ sys)':>8}{'x nginx CPU':>13}"
          f"{'% nginx req/s':>15}{'errors':>8}")
        for row in rows:
            cpu = f"{row['cpu_us']:.1f}" if row["cpu_us"] is not None else "-"
            split = (f"{row['user_us']:>7.1f}{row['sys_us']:>8.1f}" if row["cpu_us"] is not None
                     else f"{'-':>7}{'-':>8}")
            ratio = f"{row['cpu_us'] / nginx_cpu:.1f}" if row["cpu_us"] is not None else "-"
            print(f"{row['name']:<24}{row['rps']:>10.0f}{cpu:>12}{split}{ratio:>13}"
                  f"{row['rps'] / nginx_rps * 100:>14.0f}%{row['errors']:>8}")
        return 0 if not any(row["errors"] for row in rows) else 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
