"""Helpers shared by the benchmarks in bench/: ports, child processes, and /proc readings.

Everything here is stdlib only and Linux-specific where it reads /proc. The
benchmarks are scripts (``python bench/NAME.py``), so ``bench/`` is on sys.path
and this module is imported as ``_common``.
"""
import os
import signal
import socket
import subprocess
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO, "bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- ports


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, deadline, proc):
    """Return once 127.0.0.1:``port`` accepts a connection; raise if ``proc`` dies or ``deadline`` passes."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} in time")


def http_get(port, path, host, timeout):
    """The raw response, head and body, to ``GET path`` on 127.0.0.1:``port`` (``Connection: close``, read to EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


# --------------------------------------------------------------------------- /proc


def cpu_times(pid):
    """(utime, stime) of a process in seconds: fields 14 and 15 of /proc/PID/stat (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_delta(before, after):
    return after[0] - before[0], after[1] - before[1]


def parent_pid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def process_tree(pid):
    """``pid`` and its descendants (an nginx master and its workers), by scanning /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                children.setdefault(parent_pid(int(name)), []).append(int(name))
            except (OSError, ValueError, IndexError):  # gone meanwhile
                pass
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def tree_cpu(pids):
    """(utime, stime) summed over ``pids``; a process that ended meanwhile counts as 0."""
    user = system = 0.0
    for pid in pids:
        try:
            u, s = cpu_times(pid)
        except (OSError, ValueError, IndexError):
            continue
        user += u
        system += s
    return user, system


def rss_kib(pids):
    """VmRSS summed over ``pids``, in KiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def wait_quiet(pids, limit=5.0, tick=0.1):
    """Wait (at most ``limit`` s) until ``pids`` use no CPU over two ticks in a row: a phase's teardown is over."""
    deadline = time.monotonic() + limit
    last, still = tree_cpu(pids), 0
    while still < 2 and time.monotonic() < deadline:
        time.sleep(tick)
        now = tree_cpu(pids)
        still = still + 1 if now == last else 0
        last = now


# --------------------------------------------------------------------------- child processes


def glb_env(*extra_paths, source=REPO):
    """The environment for ``python -m glb``: this checkout, or the glb tree ``source``, (and ``extra_paths``)
    first on PYTHONPATH."""
    paths = [source, *extra_paths, os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def write_glb_config(directory, port, backend_port, modules="", name="lb.ini"):
    """A minimal glb config: one listener, one static backend, the given handler modules, warnings only."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""\
            [glb]
            listen = 127.0.0.1:{port}
            log_level = warning
            [handlers]
            modules = {modules}
            [backend:bench]
            url = ws://127.0.0.1:{backend_port}
            http = http://127.0.0.1:{backend_port}
            """))
    return path


def start_glb(python, directory, backend_port, deadline, modules="", extra_paths=(), name="lb.ini", source=REPO):
    """``python -m glb`` (from the tree ``source``) on a free port with a temporary config: (Popen, port)."""
    port = free_port()
    config = write_glb_config(directory, port, backend_port, modules, name)
    proc = subprocess.Popen([python, "-m", "glb", config], cwd=directory, env=glb_env(*extra_paths, source=source))
    try:
        wait_for_port(port, deadline, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def stop(proc):
    """SIGTERM, then SIGKILL after 5 s; a no-op for None or an ended process."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def temp_dir(prefix):
    return tempfile.mkdtemp(prefix=prefix)
