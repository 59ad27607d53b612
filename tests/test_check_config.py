"""`ingestd check-config` refuses what `serve` would refuse, naming the setting.

check-config and serve read a file through the one `load_config`, so each
case is run through both: check-config must refuse it (exit 2, one line naming
the setting and, for a file, the file), and serve must refuse it with the very
same line before it touches the data directory. Run in-process through
`ingestd.cli.main` (both commands stop before any event loop starts); one
subprocess test shows a start-up error of the running daemon naming its
setting.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from daemon import serve_command, without_systemd

from ingestd.cli import main


def make_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "cert.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ingestd-test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def serve(path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["serve", "--config", str(path), "--data-dir", str(data_dir)])
    _, err = capsys.readouterr()
    return code, err


# (config text, what the message must name); `{dir}` is the test's folder.
REFUSED = {
    "tls-cert-missing": (
        '[server]\ntls_cert = "{dir}/nowhere.pem"\ntls_key = "{dir}/cert.key"\n',
        ["server.tls_cert", "{dir}/nowhere.pem"],
    ),
    "tls-key-missing": (
        '[server]\ntls_cert = "{dir}/cert.pem"\ntls_key = "{dir}/nowhere.key"\n',
        ["server.tls_key", "{dir}/nowhere.key"],
    ),
    "tls-cert-is-a-folder": (
        '[server]\ntls_cert = "{dir}"\ntls_key = "{dir}/cert.key"\n',
        ["server.tls_cert", "{dir}"],
    ),
    "tls-cert-not-pem": (
        '[server]\ntls_cert = "{dir}/junk.pem"\ntls_key = "{dir}/cert.key"\n',
        ["server.tls_cert", "{dir}/junk.pem"],
    ),
    "tls-key-of-another-cert": (
        '[server]\ntls_cert = "{dir}/cert.pem"\ntls_key = "{dir}/other/cert.key"\n',
        ["server.tls_key", "{dir}/other/cert.key"],
    ),
    "listen-octet-over-255": ('[server]\nlisten = "999.1.1.1:8080"\n', ["server.listen"]),
    "listen-space-in-host": ('[server]\nlisten = "not a host:8080"\n', ["server.listen"]),
    "listen-ipv6-without-brackets": ('[server]\nlisten = "::1:8080"\n', ["server.listen"]),
    "listen-bad-ipv6": ('[server]\nlisten = "[::g]:8080"\n', ["server.listen"]),
    "listen-brackets-round-a-name": ('[server]\nlisten = "[host]:8080"\n', ["server.listen"]),
    "listen-label-too-long": (f'[server]\nlisten = "{"a" * 64}.example:80"\n', ["server.listen"]),
    "listen-label-starts-with-dash": ('[server]\nlisten = "-host:8080"\n', ["server.listen"]),
    "nan-duration": ("[server]\nshutdown_timeout_secs = nan\n", ["server.shutdown_timeout_secs"]),
    "inf-duration": (
        "[storage]\ncheckpoint_interval_secs = inf\n",
        ["storage.checkpoint_interval_secs"],
    ),
    "minus-inf": ("[storage]\nretention_days = -inf\n", ["storage.retention_days"]),
    "nan-rate": ("[json]\nrate_limit_per_min = nan\n", ["json.rate_limit_per_min"]),
    "nan-jetstream-timeout": (
        "[jetstream]\npublish_timeout_secs = nan\n",
        ["jetstream.publish_timeout_secs"],
    ),
    "nats-url-bad-scheme": (
        '[jetstream]\nservers = ["htp:/bad"]\n',
        ["jetstream.servers", "htp:/bad"],
    ),
    "nats-url-no-host": ('[jetstream]\nservers = ["nats://:4222"]\n', ["jetstream.servers"]),
    "nats-url-bad-port": ('[jetstream]\nservers = ["nats://host:99999"]\n', ["jetstream.servers"]),
    "nats-url-http": ('[jetstream]\nservers = ["http://host:4222"]\n', ["jetstream.servers"]),
    "wattmon-path-under-api": ('[wattmon]\npaths = ["/api/wattmon"]\n', ["wattmon.paths"]),
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A valid certificate pair, one of another pair, and a non-PEM file."""
    make_certificate(tmp_path)
    (tmp_path / "other").mkdir()
    make_certificate(tmp_path / "other")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    return tmp_path


@pytest.mark.parametrize(("text", "names"), REFUSED.values(), ids=REFUSED.keys())
def test_check_config_and_serve_refuse_alike(
    folder: Path, capsys: pytest.CaptureFixture[str], text: str, names: list[str]
) -> None:
    """check-config exits 2 with one line naming the setting (and the file);
    serve exits 2 with that same line, and has not made the data directory."""
    config = folder / "ingestd.toml"
    config.write_text(text.replace("{dir}", str(folder)))
    code, out, err = check_config(config, capsys)
    assert (code, out) == (2, ""), err
    assert err.startswith("ingestd: ") and err.count("\n") == 1, err
    for name in names:
        assert name.replace("{dir}", str(folder)) in err, err
    assert "Errno" not in err and "Traceback" not in err, err

    data_dir = folder / "data"
    assert serve(config, data_dir, capsys) == (2, err)
    assert not data_dir.exists()


ACCEPTED = {
    "tls-pair": '[server]\ntls_cert = "{dir}/cert.pem"\ntls_key = "{dir}/cert.key"\n',
    "listen-ipv4": '[server]\nlisten = "127.0.0.1:8080"\n',
    "listen-any-port-only": '[server]\nlisten = ":8080"\n',
    "listen-ipv6": '[server]\nlisten = "[::1]:8080"\n',
    "listen-ipv6-any": '[server]\nlisten = "[::]:8080"\n',
    "listen-name": '[server]\nlisten = "localhost:8080"\n',
    "listen-dotted-name": '[server]\nlisten = "collector-1.example.net:8080"\n',
    "nats-urls": (
        '[jetstream]\nservers = ["nats://a:4222", "tls://b.example:4222", "ws://c", '
        '"wss://d:443", "nats://user:pw@[::1]:4222"]\n'
    ),
}


@pytest.mark.parametrize("text", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_check_config_accepts_what_serve_can_use(
    folder: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    config = folder / "ingestd.toml"
    config.write_text(text.replace("{dir}", str(folder)))
    assert check_config(config, capsys) == (0, f"{config}: OK\n", "")


def test_serve_listen_flag_is_checked_like_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--listen` overrides the file and is held to the same rules."""
    data_dir = tmp_path / "data"
    code = main(["serve", "--listen", "999.1.1.1:8080", "--data-dir", str(data_dir)])
    _, err = capsys.readouterr()
    assert code == 2 and "server.listen" in err and "999.1.1.1" in err, err
    assert not data_dir.exists()


def test_start_up_failure_of_storage_names_the_data_dir(tmp_path: Path) -> None:
    """A data directory that cannot be made (its parent is a file) is found
    only when serve opens storage: the error names `storage.data_dir` and the
    path, and serve exits 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data_dir = blocker / "data"
    env = without_systemd()
    done = subprocess.run(
        serve_command("--listen", "127.0.0.1:0", "--data-dir", str(data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    assert "startup_failed" in done.stderr, done.stderr
    assert "setting=storage.data_dir" in done.stderr, done.stderr
    assert str(data_dir) in done.stderr or ascii(str(data_dir)) in done.stderr, done.stderr
