"""The execution sandbox (qwen3coder.train.sandbox): results, limits, isolation, cleanup, parallelism."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from qwen3coder.train.sandbox import (SandboxConfig, SandboxPool, _is_alive, _pids_of_uid, probe_isolation,
                                     run_in_sandbox)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="the sandbox needs Linux (/proc, namespaces)")


def test_passing_program():
    r = run_in_sandbox("import sys\nprint('hello')\nprint('err', file=sys.stderr)\n", timeout_s=10)
    assert r.passed and r.status == "passed" and r.returncode == 0 and not r.timed_out
    assert r.stdout == "hello\n" and r.stderr == "err\n"
    assert r.network_isolation in ("netns", "userns+netns", "audit-hook") and r.error is None


def test_failing_assertion_and_exit_code():
    r = run_in_sandbox("def f():\n    return 1\nassert f() == 2, 'wrong'\n", timeout_s=10)
    assert not r.passed and r.status == "failed" and r.returncode == 1
    assert "AssertionError: wrong" in r.stderr and "main.py" in r.stderr
    r = run_in_sandbox("raise SystemExit(3)", timeout_s=10)
    assert (r.passed, r.returncode, r.status) == (False, 3, "failed")


def test_infinite_loop_times_out():
    start = time.monotonic()
    r = run_in_sandbox("while True:\n    pass\n", timeout_s=1.0)
    assert r.timed_out and r.status == "timeout" and not r.passed
    assert time.monotonic() - start < 6


def test_memory_bomb_is_stopped():
    r = run_in_sandbox("x = bytearray(4 * 1024**3)\nprint('allocated')\n", timeout_s=10, memory_mb=256)
    assert not r.passed and "allocated" not in r.stdout
    assert "MemoryError" in r.stderr or r.signal is not None
    r = run_in_sandbox("xs = []\nwhile True:\n    xs.append(bytearray(16 * 1024**2))\n", timeout_s=10, memory_mb=256)
    assert not r.passed and not r.timed_out and ("MemoryError" in r.stderr or r.signal is not None)


def test_fork_bomb_is_contained_and_cleaned_up():
    start = time.monotonic()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_in_sandbox(bomb, timeout_s=2.0, config=SandboxConfig(max_processes=16))
    assert not r.passed and r.timed_out
    assert time.monotonic() - start < 15
    if r.user_isolation.startswith("uid "):
        uid = int(r.user_isolation.split()[1])
        assert [p for p in _pids_of_uid(uid) if _is_alive(p)] == []  # all dead (zombies wait for init)


def test_detached_child_is_killed():
    marker = f"qwen3coder-sandbox-test-{uuid.uuid4().hex}"
    prog = ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'], start_new_session=True)\n")
    r = run_in_sandbox(prog, timeout_s=10)
    assert r.passed
    time.sleep(0.2)
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    alive.append(pid)
        except OSError:
            pass
    assert alive == [] or not r.user_isolation.startswith("uid ")  # without a private uid: setsid escapes


NET_PROG = """
import socket
for host, port in (("1.1.1.1", 80), ("127.0.0.1", 22), ("8.8.8.8", 53)):
    try:
        s = socket.create_connection((host, port), timeout=2)
        print("CONNECTED", host)
    except OSError as e:
        print("blocked", host, type(e).__name__)
"""


def test_network_is_unreachable():
    r = run_in_sandbox(NET_PROG, timeout_s=20)
    assert r.passed, r.stderr
    assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 3


def test_audit_hook_fallback_blocks_sockets_and_spawning():
    cfg = SandboxConfig(network="audit-hook")
    r = run_in_sandbox(NET_PROG, timeout_s=20, config=cfg)
    assert r.network_isolation == "audit-hook"
    assert r.passed and "CONNECTED" not in r.stdout and "PermissionError" in r.stdout
    r = run_in_sandbox("import subprocess\nsubprocess.run(['true'])\n", timeout_s=10, config=cfg)
    assert not r.passed and "not allowed" in r.stderr


def test_working_directory_is_private_and_removed():
    escape = f"qwen3coder-escape-{uuid.uuid4().hex}"
    prog = ("import os\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\n"
            f"for p in ('../{escape}', '../../{escape}'):\n"
            "    try:\n        open(p, 'w').write('y')\n    except OSError as e:\n        print('denied', p)\n")
    r = run_in_sandbox(prog, timeout_s=10, files={"helper.py": "X = 1\n"})
    assert r.passed, r.stderr
    cwd = r.stdout.splitlines()[0]
    assert "['helper.py', 'main.py', 'out.txt']" in r.stdout
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(cwd)), escape))


def test_stdin_files_and_output_cap():
    r = run_in_sandbox("import sys, helper\nprint(sys.stdin.read().upper(), helper.X)\n", timeout_s=10,
                       stdin="abc", files={"helper.py": "X = 7\n"})
    assert r.passed and r.stdout == "ABC 7\n"
    r = run_in_sandbox("print('x' * 100000)", timeout_s=10, config=SandboxConfig(max_output_bytes=1000))
    assert r.passed and len(r.stdout) == 1000 and r.output_truncated
    with pytest.raises(ValueError, match="relative path"):
        run_in_sandbox("pass", files={"../x.py": ""})


def test_environment_is_minimal():
    r = run_in_sandbox("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\n", timeout_s=10)
    assert r.passed
    names = eval(r.stdout.splitlines()[0])  # noqa: S307 - our own output
    assert set(names) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE"}
    assert r.stdout.splitlines()[1] == "1"


def test_many_in_parallel():
    progs = [f"import time\ntime.sleep(0.3)\nprint({i})\n" for i in range(12)]
    progs[5] = "raise ValueError('five')"
    start = time.monotonic()
    with SandboxPool(max_workers=6) as pool:
        results = pool.map(progs, timeout_s=10)
    elapsed = time.monotonic() - start
    assert [r.passed for r in results] == [i != 5 for i in range(12)]
    assert [r.stdout.strip() for i, r in enumerate(results) if i != 5] == [str(i) for i in range(12) if i != 5]
    assert elapsed < 12 * 0.3  # ran concurrently


def test_probe_and_config_validation():
    probe = probe_isolation()
    assert probe["status"] == "passed" and probe["network"] in ("netns", "userns+netns", "audit-hook")
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="network"):
        SandboxConfig(network="sometimes")
    with pytest.raises(TypeError):
        run_in_sandbox(b"print(1)")  # type: ignore[arg-type]
