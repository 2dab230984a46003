"""Subprocess sandboxes for untrusted, model-written Python (evaluation and the RL reward).

``run_in_sandbox(program, timeout_s, memory_mb)`` runs one program; ``SandboxPool(max_workers)``
runs many in parallel (threads that each wait on one child process). Every run gets:

* a fresh temporary directory as its working directory (``HOME`` and ``TMPDIR`` too), removed after;
* ``python -I -B`` (isolated mode: no user site, no ``PYTHON*`` variables, script dir not on the
  path) and a minimal environment;
* resource limits set in the child before the program starts: ``RLIMIT_AS`` (memory),
  ``RLIMIT_CPU``, ``RLIMIT_NPROC`` (fork bombs), ``RLIMIT_FSIZE`` (file and output size),
  ``RLIMIT_NOFILE`` and ``RLIMIT_CORE=0``;
* no network: a new, empty network namespace (``unshare(CLONE_NEWNET)``; as root directly, otherwise
  inside a new user namespace), or, where neither works, the documented fallback: an audit hook that
  refuses socket creation, process spawning and ctypes (best effort; see docs/EVAL.md);
* when the parent runs as root: a private, otherwise unused uid/gid per concurrent run (held with a
  lock file so that other processes on the machine do not pick it), so the program cannot write to
  root-owned paths, cannot raise its limits, ``RLIMIT_NPROC`` is enforced, and every process it left
  behind (even ones that called ``setsid``) is found and killed after the run, together with the files
  it left in ``/tmp``, ``/var/tmp`` and ``/dev/shm``;
* a wall-clock timeout after which the whole process group is killed with ``SIGKILL``;
* stdout and stderr written to files outside the working directory and read back capped.

The mechanism that actually applied is reported by the child itself (through a pipe it closes before
the program runs) in ``SandboxResult.network_isolation`` / ``user_isolation``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["SandboxConfig", "SandboxResult", "SandboxPool", "run_in_sandbox", "probe_isolation"]

_NETWORK_MODES = ("auto", "netns", "audit-hook", "off")
_SWEEP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and policy of a sandboxed run (all sizes in MiB unless named otherwise)."""

    timeout_s: float = 10.0  # wall clock; the process group is SIGKILLed after it
    memory_mb: int = 1024  # RLIMIT_AS (virtual address space) of each process
    cpu_s: float | None = None  # RLIMIT_CPU per process; None: ceil(timeout_s) + 1
    max_processes: int = 32  # RLIMIT_NPROC (processes of the sandbox uid, or above the current count)
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file (stdout/stderr included) the program can write
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 64 * 1024  # per stream, read back from the output files
    network: str = "auto"  # auto: netns, else the audit hook | netns: require it | audit-hook | off
    drop_privileges: bool = True  # as root: run under a private uid (ignored otherwise)
    uid_base: int = 1_900_000_000  # first private uid; uid_base .. uid_base + uid_count - 1 are used
    uid_count: int = 4096
    python: str = sys.executable
    tmp_root: str | None = None  # where run directories are created (None: the system default)

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"SandboxConfig.timeout_s must be > 0, got {self.timeout_s!r}")
        for name in ("memory_mb", "max_processes", "max_file_mb", "max_open_files", "max_output_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SandboxConfig.{name} must be an int >= 1, got {value!r}")
        if self.max_open_files < 16:
            raise ValueError(f"SandboxConfig.max_open_files must be >= 16 (Python needs a few), got {self.max_open_files}")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ValueError(f"SandboxConfig.cpu_s must be > 0 or None, got {self.cpu_s!r}")
        if self.network not in _NETWORK_MODES:
            raise ValueError(f"SandboxConfig.network must be one of {_NETWORK_MODES}, got {self.network!r}")
        if not 0 < self.uid_base < 2**32 - self.uid_count - 1:
            raise ValueError(f"SandboxConfig.uid_base out of range: {self.uid_base}")


@dataclass
class SandboxResult:
    """Outcome of one run. ``passed``: exit status 0 within the time limit."""

    passed: bool
    returncode: int | None  # negative: killed by that signal (subprocess convention)
    stdout: str
    stderr: str
    timed_out: bool
    status: str  # passed | failed | timeout | killed | sandbox-error
    duration_s: float
    signal: str | None = None  # name of the signal that ended the program, if any
    output_truncated: bool = False
    network_isolation: str = "unknown"  # netns | userns+netns | audit-hook | none
    user_isolation: str = "unknown"  # "uid <n>" (private uid) | "same-user"
    filesystem: str = "unknown"  # host | mount-ns (hidden: <dirs only root could enter>)
    leftover_processes_killed: int = 0
    error: str | None = None  # a sandbox failure (not the program's)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------- private uids
class _UidLease:
    """A uid no other run (in this or another process) uses right now, held with a lock file."""

    _lock = threading.Lock()
    _in_use: set[int] = set()
    _next = 0

    def __init__(self, config: SandboxConfig) -> None:
        lock_dir = os.path.join(tempfile.gettempdir(), "qwen3coder-sandbox-uids")
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        self.uid = -1
        self._fd = -1
        with _UidLease._lock:
            for i in range(config.uid_count):
                uid = config.uid_base + (_UidLease._next + i) % config.uid_count
                if uid in _UidLease._in_use:
                    continue
                fd = os.open(os.path.join(lock_dir, str(uid)), os.O_CREAT | os.O_RDWR, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                _UidLease._in_use.add(uid)
                _UidLease._next = (_UidLease._next + i + 1) % config.uid_count
                self.uid, self._fd = uid, fd
                return
        raise RuntimeError(f"no free sandbox uid in [{config.uid_base}, {config.uid_base + config.uid_count})")

    def release(self) -> None:
        with _UidLease._lock:
            _UidLease._in_use.discard(self.uid)
        os.close(self._fd)


def _pids_of_uid(uid: int) -> list[int]:
    """Processes whose real or effective uid is ``uid`` (from /proc/<pid>/status)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        ids = line.split()[1:3]
                        if str(uid).encode() in ids:
                            pids.append(int(name))
                        break
        except OSError:
            continue
    return pids


def _sweep_uid(uid: int) -> int:
    """Kill every process of ``uid``; return how many were alive. ``kill -KILL -1`` run as that uid
    signals all of them in one kernel pass, so a fork bomb cannot outrun it."""
    found = 0
    for _ in range(20):
        pids = [p for p in _pids_of_uid(uid) if _is_alive(p)]
        if not pids:
            return found
        found = max(found, len(pids))
        kill = shutil.which("kill", path="/usr/bin:/bin")
        if kill:
            subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env={},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)
    return found


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _sweep_files(uid: int) -> None:
    """Remove what ``uid`` left at the top of the shared temporary directories."""
    for top in _SWEEP_DIRS:
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


# ----------------------------------------------------------------------------------- one run
def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``proc`` to exit WITHOUT reaping it (its pid keeps the process group alive for
    ``killpg``). Returns False on timeout."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        if pidfd >= 0:
            ready, _, _ = select.select([pidfd], [], [], timeout_s)
            return bool(ready)
        delay = 0.001
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return False
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _read_capped(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def _write_files(work: str, files: Mapping[str, str | bytes]) -> None:
    for rel, content in files.items():
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm.startswith("..") or norm in (".", "main.py"):
            raise ValueError(f"sandbox file name {rel!r} must be a relative path inside the sandbox (not main.py)")
        path = os.path.join(work, norm)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)


def run_in_sandbox(program: str, timeout_s: float | None = None, memory_mb: int | None = None, *,
                   stdin: str | None = None, files: Mapping[str, str | bytes] | None = None,
                   config: SandboxConfig | None = None) -> SandboxResult:
    """Run Python source ``program`` in a sandbox (see the module docstring).

    ``timeout_s`` / ``memory_mb`` override ``config``'s; ``files`` are written next to ``main.py``
    (the program) in the working directory, which is on ``sys.path``; ``stdin`` is fed to the program.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    cfg = config or SandboxConfig()
    overrides = {k: v for k, v in (("timeout_s", timeout_s), ("memory_mb", memory_mb)) if v is not None}
    if overrides:
        cfg = replace(cfg, **overrides)
    lease = _UidLease(cfg) if cfg.drop_privileges and os.geteuid() == 0 else None
    run_root = tempfile.mkdtemp(prefix="qwen3coder-sandbox-", dir=cfg.tmp_root)
    if lease is not None:  # the private uid may pass through (to its own 0700 work dir), not list or read
        os.chmod(run_root, 0o711)
    start = time.monotonic()
    try:
        return _run(program, cfg, run_root, lease.uid if lease else None, stdin, files or {}, start)
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
        if lease is not None:
            lease.release()


def _run(program: str, cfg: SandboxConfig, run_root: str, uid: int | None, stdin: str | None,
         files: Mapping[str, str | bytes], start: float) -> SandboxResult:
    work = os.path.join(run_root, "work")
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
        f.write(program)
    _write_files(work, files)
    if uid is not None:
        for dirpath, dirnames, filenames in os.walk(work):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.chown(name, uid, uid)
    stdin_path = os.path.join(run_root, "stdin")
    with open(stdin_path, "wb", opener=_private) as f:
        f.write((stdin or "").encode("utf-8"))
    cpu_s = cfg.cpu_s if cfg.cpu_s is not None else math.ceil(cfg.timeout_s) + 1
    child_cfg = {
        "memory_bytes": cfg.memory_mb * 1024 * 1024, "cpu_s": int(math.ceil(cpu_s)),
        "max_processes": cfg.max_processes, "file_bytes": cfg.max_file_mb * 1024 * 1024,
        "max_open_files": cfg.max_open_files, "network": cfg.network, "uid": uid,
    }
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8"}
    out_path, err_path = os.path.join(run_root, "stdout"), os.path.join(run_root, "stderr")
    report_r, report_w = os.pipe()
    try:
        with open(stdin_path, "rb") as fin, open(out_path, "wb", opener=_private) as fout, \
                open(err_path, "wb", opener=_private) as ferr:
            proc = subprocess.Popen(
                [cfg.python, "-I", "-B", _CHILD, json.dumps(child_cfg), str(report_w)],
                cwd=work, env=env, stdin=fin, stdout=fout, stderr=ferr, pass_fds=(report_w,),
                start_new_session=True, close_fds=True)
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    timed_out = False
    leftovers = 0
    try:
        timed_out = not _wait(proc, cfg.timeout_s)
    finally:
        try:  # the leader is a zombie or still running: the group id cannot have been reused
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        if uid is not None:
            leftovers = _sweep_uid(uid)
            _sweep_files(uid)
    duration = time.monotonic() - start
    with os.fdopen(report_r, "rb") as f:
        raw_report = f.read()
    try:
        report = json.loads(raw_report.decode() or "{}")
    except ValueError:
        report = {"error": f"unreadable isolation report {raw_report[:200]!r}"}
    stdout, trunc_out = _read_capped(out_path, cfg.max_output_bytes)
    stderr, trunc_err = _read_capped(err_path, cfg.max_output_bytes)
    rc = proc.returncode
    sig = signal.Signals(-rc).name if rc is not None and rc < 0 and -rc in signal.valid_signals() else None
    error = report.get("error")
    if error is None and not report.get("ready") and not timed_out:
        error = "the sandbox bootstrap did not start the program: " + stderr[-500:]
    if error is not None:
        status = "sandbox-error"
    elif timed_out:
        status = "timeout"
    elif rc == 0:
        status = "passed"
    elif sig is not None:
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(
        passed=status == "passed", returncode=rc, stdout=stdout, stderr=stderr, timed_out=timed_out,
        status=status, duration_s=duration, signal=sig, output_truncated=trunc_out or trunc_err,
        network_isolation=report.get("network", "unknown"),
        user_isolation=f"uid {uid}" if uid is not None and report.get("ready") else report.get("user", "unknown"),
        filesystem=report.get("fs", "unknown"), leftover_processes_killed=leftovers, error=error)


# ----------------------------------------------------------------------------------- many runs
class SandboxPool:
    """Run many sandboxed programs in parallel (``max_workers`` at a time).

    >>> with SandboxPool(8) as pool:
    ...     results = pool.map(["print(1)", "raise SystemExit(3)"], timeout_s=5)
    """

    def __init__(self, max_workers: int | None = None, config: SandboxConfig | None = None) -> None:
        self.max_workers = max_workers or max(1, min(32, os.cpu_count() or 1))
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        self.config = config or SandboxConfig()
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="sandbox")

    def submit(self, program: str, **kwargs: Any) -> Future[SandboxResult]:
        """Schedule one run; ``kwargs`` as for ``run_in_sandbox`` (``config`` defaults to the pool's)."""
        kwargs.setdefault("config", self.config)
        return self._executor.submit(run_in_sandbox, program, **kwargs)

    def map(self, programs: Sequence[str], **kwargs: Any) -> list[SandboxResult]:
        """Run every program (same settings); results in input order."""
        futures = [self.submit(p, **kwargs) for p in programs]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_PROBE: dict[str, str] | None = None


def probe_isolation(config: SandboxConfig | None = None) -> dict[str, str]:
    """Run a trivial program once and report the isolation mechanisms that apply on this machine."""
    global _PROBE
    if _PROBE is None or config is not None:
        r = run_in_sandbox("pass", timeout_s=30, config=config)
        probe = {"network": r.network_isolation, "user": r.user_isolation.split(" ")[0], "status": r.status}
        if r.error:
            probe["error"] = r.error
        if config is not None:
            return probe
        _PROBE = probe
    return dict(_PROBE)
