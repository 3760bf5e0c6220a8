"""The `node` and `coordinator` commands, run as real processes."""

import os
import stat
import subprocess
import sys

from protocol import poolspec

KEY = "ab" * 32


def _run(tmp_path, *args, env_extra=None):
    env = {**os.environ, "SWARMRL_HOME": str(tmp_path / "home"), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_node_keygen_then_info(tmp_path):
    out = _run(tmp_path, "node", "keygen")
    assert out.returncode == 0, out.stderr
    key = tmp_path / "home" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    peer = next(line.split()[-1] for line in out.stdout.splitlines() if "peer id" in line)
    info = _run(
        tmp_path,
        "node",
        "info",
        "--bootstrap",
        "/ip4/127.0.0.1/tcp/9",
        "--set",
        "max_batch=4",
        env_extra={"SWARMRL_BOOTSTRAP": "/ip4/127.0.0.1/tcp/8"},
    )
    assert info.returncode == 0, info.stderr
    assert peer in info.stdout
    assert "bootstrap = ['/ip4/127.0.0.1/tcp/9']" in info.stdout  # the flag beats the env
    assert "max_batch = 4" in info.stdout
    again = _run(tmp_path, "node", "keygen")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_node_config_file_and_env(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('engine = "vllm"\nmax_batch = 7\n')
    info = _run(
        tmp_path,
        "node",
        "info",
        "--config",
        str(cfg),
        env_extra={"SWARMRL_BOOTSTRAP": "/ip4/127.0.0.1/tcp/8 /ip4/127.0.0.1/tcp/7"},
    )
    assert info.returncode == 0, info.stderr
    assert "engine = 'vllm'" in info.stdout and "max_batch = 7" in info.stdout
    assert "'/ip4/127.0.0.1/tcp/8', '/ip4/127.0.0.1/tcp/7'" in info.stdout


def test_node_info_refuses_bad_config_and_public_key(tmp_path):
    bad = _run(tmp_path, "node", "info", "--set", "max_batch=0")
    assert bad.returncode == 2 and "max_batch" in bad.stderr
    assert _run(tmp_path, "node", "keygen").returncode == 0
    (tmp_path / "home" / "node.key").chmod(0o644)
    leaky = _run(tmp_path, "node", "info")
    assert leaky.returncode == 2 and "chmod 600" in leaky.stderr


def test_coordinator_keygen_and_pool_id(tmp_path):
    out = _run(tmp_path, "trainer", "keygen", "--out", str(tmp_path / "c.key"))
    assert out.returncode == 0, out.stderr
    spec = tmp_path / "pool.toml"
    spec.write_text(f'name = "t"\n[coordinator]\npublic_key = "{KEY}"\n')
    got = _run(tmp_path, "trainer", "id", str(spec))
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == poolspec.pool_id(poolspec.load(spec))
    spec.write_text("name = 1\n")
    bad = _run(tmp_path, "trainer", "id", str(spec))
    assert bad.returncode == 2 and "invalid pool spec" in bad.stderr


def test_every_command_has_version_and_the_same_logging_flags(tmp_path):
    for command in ("node", "trainer", "shardcast"):
        out = _run(tmp_path, command, "--version")
        assert out.returncode == 0 and "(swarmrl) " in out.stdout, out.stderr
    for command, sub in (("node", "join"), ("trainer", "run"), ("shardcast", "fetch")):
        out = _run(tmp_path, command, sub, "--help")
        for flag in ("--log-level", "--quiet", "--libp2p-log-level"):
            assert flag in out.stdout, (command, flag)
    for command, sub in (("node", "join"), ("trainer", "run"), ("trainer", "init")):
        text = _run(tmp_path, command, sub, "--help").stdout
        assert (
            "examples:" in text
            and f"{'coordinator' if command == 'trainer' else command} {sub}" in text
        )


def test_unreachable_bootstrap_prints_no_libp2p_lines(tmp_path):
    """py-libp2p logged each failed dial through Python's last-resort handler (64 lines in 25 s
    with --quiet); now only swarmrl's own warnings remain."""
    import signal

    env = {**os.environ, "SWARMRL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    peer = "12D3KooWEra97ji9SjpwWBY3hjAi7ANCD6d2J6ZV1EtJAZKxTMUp"
    bootstrap = f"/ip4/127.0.0.1/tcp/9/p2p/{peer}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node",
            "join",
            "--pool",
            "a" * 24,
            "--quiet",
            "--bootstrap",
            bootstrap,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    err = ""
    for line in proc.stderr:  # until the node has tried the bootstrap twice
        err += line
        if err.count("discovery failed") >= 2:
            break
    proc.send_signal(signal.SIGINT)
    err += proc.communicate(timeout=60)[1]
    assert "discovery failed" in err
    assert "Failed to open TCP stream" not in err and "libp2p" not in err.replace("--libp2p", "")
