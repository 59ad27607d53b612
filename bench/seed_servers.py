"""The seeds' own sample receivers, started for bench/run.py's table.

php: the Wattmon page's export-script.php (bench/seeds/) under nginx and
php-fpm (pm = static, 4 children), both pinned to the given cores. node: the
Allegro page's Node.js server (bench/seeds/allegro-server.js), patched only
where current Node refuses it. Both store as written: no fsync, the PHP
script appending every block to one data.txt, the Node one writing a file a
post. Configs, sockets, logs and stored data go under the run's directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

SEEDS = Path(__file__).resolve().parent / "seeds"
PHP_SCRIPT = SEEDS / "export-script.php"
NODE_SCRIPT = SEEDS / "allegro-server.js"
# The Node script listens on this port, as written: the bench leaves it be.
NODE_PORT = 3000
# Node 20 refuses an array in fs.writeFile (old Node wrote its chunks joined
# with commas); the issue allows exactly this one patch.
NODE_PATCH = (
    "fs.writeFile(outputFilename, data,",
    "fs.writeFile(outputFilename, Buffer.concat(data),",
)
FASTCGI_PARAMS = Path("/etc/nginx/fastcgi_params")


def _executable(*patterns: str) -> str:
    """The first match of `patterns` (globs) on PATH or in /usr/sbin; Debian's
    php-fpm carries its version in its name (php-fpm8.2)."""
    folders = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin"]
    for pattern in patterns:
        for folder in folders:
            for found in sorted(glob.glob(os.path.join(folder, pattern))):
                if os.access(found, os.X_OK):
                    return found
    raise RuntimeError(f"not installed: {patterns[0]} (apt-get install -y nginx php-fpm nodejs)")


def _wait_for(
    connect: socket.socket,
    address: str | tuple[str, int],
    what: str,
    proc: subprocess.Popen[bytes],
    timeout: float = 20,
) -> None:
    deadline = time.monotonic() + timeout
    with connect:
        while connect.connect_ex(address) != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.05)


def php_fpm_config(run_dir: Path, www: Path) -> str:
    # Root may run the pool only as a named user (and with -R); others run as themselves.
    user = "user = root\ngroup = root\n" if os.geteuid() == 0 else ""
    return f"""[global]
pid = {run_dir}/php-fpm.pid
error_log = {run_dir}/php-fpm.log
daemonize = no

[seed]
{user}listen = {run_dir}/php-fpm.sock
listen.mode = 0600
pm = static
pm.max_children = 4
; the script opens data.txt relative to its working directory
chdir = {www}
; the script opens with "<?", code only with short_open_tag (off in Debian's php.ini)
php_admin_flag[short_open_tag] = on
"""


def nginx_config(run_dir: Path, www: Path, port: int) -> str:
    # As root, nginx would hand its worker to "nobody", who cannot reach the socket.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {run_dir}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # No access log: a cost the other rows do not pay either.
    return f"""daemon off;
{user}worker_processes 1;
pid {run_dir}/nginx.pid;
error_log {run_dir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    server {{
        listen 127.0.0.1:{port};
        location = /wattmon {{
            include {FASTCGI_PARAMS};
            fastcgi_param SCRIPT_FILENAME {www}/export-script.php;
            fastcgi_pass unix:{run_dir}/php-fpm.sock;
        }}
    }}
}}
"""


def start_php(run_dir: Path, port: int, cores: str) -> tuple[list[subprocess.Popen[bytes]], Path]:
    """nginx on `port` in front of php-fpm; returns the processes (stop them in
    reverse) and the folder the script stores in."""
    www = run_dir / "www"
    www.mkdir()
    shutil.copyfile(PHP_SCRIPT, www / "export-script.php")
    (run_dir / "php-fpm.conf").write_text(php_fpm_config(run_dir, www))
    (run_dir / "nginx.conf").write_text(nginx_config(run_dir, www, port))
    fpm = subprocess.Popen(
        [
            "taskset",
            "-c",
            cores,
            _executable("php-fpm", "php-fpm*"),
            "--nodaemonize",
            "--fpm-config",
            str(run_dir / "php-fpm.conf"),
            *(["-R"] if os.geteuid() == 0 else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs = [fpm]
    try:
        _wait_for(socket.socket(socket.AF_UNIX), str(run_dir / "php-fpm.sock"), "php-fpm", fpm)
        nginx = subprocess.Popen(
            [
                "taskset",
                "-c",
                cores,
                _executable("nginx"),
                "-p",
                str(run_dir),
                "-c",
                str(run_dir / "nginx.conf"),
                "-e",
                str(run_dir / "nginx-error.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(nginx)
        _wait_for(socket.socket(), ("127.0.0.1", port), "nginx", nginx)
    except BaseException:
        stop(procs)
        raise
    return procs, www


def start_node(run_dir: Path, cores: str) -> tuple[list[subprocess.Popen[bytes]], Path]:
    """The Node script on its own port (NODE_PORT); it writes its files in `run_dir`/store."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", NODE_PORT)) == 0:
            raise RuntimeError(f"port {NODE_PORT}, the Node script's own, is taken")
    source = NODE_SCRIPT.read_text()
    old, new = NODE_PATCH
    if source.count(old) != 1:
        raise RuntimeError(f"{NODE_SCRIPT}: the patched call is not there once")
    store = run_dir / "store"
    store.mkdir()
    script = run_dir / "allegro-server.js"
    script.write_text(source.replace(old, new))
    # stdout to /dev/null: the script's console.log of each post costs it less than a terminal.
    node = subprocess.Popen(
        ["taskset", "-c", cores, _executable("node", "nodejs"), str(script)],
        cwd=store,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(socket.socket(), ("127.0.0.1", NODE_PORT), "node", node)
    except BaseException:
        stop([node])
        raise
    return [node], store


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each, the last started first (nginx before the php-fpm behind it)."""
    for proc in reversed(procs):
        proc.terminate()
        proc.wait(timeout=60)


def stored_bytes(store: Path) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(store) if entry.is_file())


def check_answer(port: int, path: str, body: bytes, content_type: str, expected: bytes) -> None:
    """One post as a device makes it: the answer must be 200 and `expected`."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = response.read()
    if answer != expected:
        raise RuntimeError(f"{path} answered {answer[:80]!r}, not {expected!r}")
