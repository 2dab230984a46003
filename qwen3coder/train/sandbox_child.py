"""The first code of a sandboxed child process (see ``qwen3coder.train.sandbox``).

Run as ``python -I -B sandbox_child.py <config json> <report fd>`` in the run's working directory.
Standard library only. In order: read ``main.py``; enter a new network namespace (directly, or
inside a new user namespace when not root); set the resource limits; when given a uid: hide
root-only directories around the interpreter in a private mount namespace and drop to that uid;
without a network namespace install the fallback audit hook; write a JSON report to the pipe and
close it; run ``main.py`` as ``__main__``. A setup failure exits with status 125 and an ``error``
in the report. Importing this module does nothing.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any, NoReturn

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 2, 4, 4096, 8192, 16384, 262144
SETUP_FAILED = 125

#: Audit events refused when no network namespace could be made (best effort, see docs/EVAL.md).
BLOCKED_EVENTS = frozenset((
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg", "os.system", "os.exec", "os.posix_spawn",
    "os.spawn", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
    "ctypes.cdata", "ctypes.call_function",
))


def _libc() -> Any:
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    if hasattr(os, "unshare"):  # Python >= 3.12
        os.unshare(flags)
        return
    ctypes, libc = _libc()
    if libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    ctypes, libc = _libc()

    def enc(v: str | None) -> bytes | None:
        return None if v is None else v.encode()

    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {dst}: {os.strerror(err)}")


def enter_network_namespace(mode: str, root: bool) -> tuple[str, str]:
    """Returns (mechanism, why the namespace failed or "")."""
    if mode not in ("auto", "netns"):
        return "none", ""
    try:
        _unshare(CLONE_NEWNET)  # a namespace with only a loopback device, down
        return "netns", ""
    except OSError as exc:
        why = f"unshare(CLONE_NEWNET): {exc}"
    if root:
        return "none", why
    uid, gid = os.geteuid(), os.getegid()
    try:
        _unshare(CLONE_NEWUSER | CLONE_NEWNET)
        for name, value in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(value)
        return "userns+netns", ""
    except OSError as exc:
        return "none", f"{why}; unshare(CLONE_NEWUSER|CLONE_NEWNET): {exc}"


def _count_own_processes() -> int:
    me, n = str(os.getuid()).encode(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status", "rb") as f:
                    n += any(line.startswith(b"Uid:") and line.split()[1] == me for line in f)
            except OSError:
                pass
    return n


def set_limits(cfg: dict[str, Any], root: bool) -> None:
    nproc = cfg["max_processes"]
    if cfg["uid"] is None and not root:  # RLIMIT_NPROC counts all processes of the user
        nproc += _count_own_processes()
    for res, soft, hard in (
            (resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
            (resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1),
            (resource.RLIMIT_FSIZE, cfg["file_bytes"], cfg["file_bytes"]),
            (resource.RLIMIT_NOFILE, cfg["max_open_files"], cfg["max_open_files"]),
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_NPROC, nproc, nproc)):
        cur = resource.getrlimit(res)[1]
        if cur != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur), min(hard, cur)
        resource.setrlimit(res, (soft, hard))


def expose_python() -> str:
    """Make the interpreter readable for the private uid.

    An ancestor directory of the interpreter's trees that only root may enter (e.g. a pyenv Python
    under ``/root``, mode 0700) is replaced, in a private mount namespace, by an empty tmpfs into
    which just those trees are bind-mounted back; everything else in it stays hidden.
    """
    want = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)})
    want = [d for d in want if not any(d != o and d.startswith(o + os.sep) for o in want)]
    blocked: dict[str, list[str]] = {}
    for d in want:
        cur = ""
        for part in d.strip(os.sep).split(os.sep)[:-1]:
            cur += os.sep + part
            if not os.stat(cur).st_mode & 0o001:
                blocked.setdefault(cur, []).append(d)
                break
    if not blocked:
        return "host"
    _unshare(CLONE_NEWNS)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    stash_root = os.path.dirname(os.getcwd())  # the run directory, root-only
    for i, (top, dirs) in enumerate(sorted(blocked.items())):
        stashes = []
        for j, d in enumerate(dirs):
            stash = os.path.join(stash_root, f".py-{i}-{j}")
            os.mkdir(stash, 0o700)
            _mount(d, stash, None, MS_BIND | MS_REC)
            stashes.append((d, stash))
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for d, stash in stashes:
            os.makedirs(d, 0o755, exist_ok=True)
            _mount(stash, d, None, MS_MOVE)
            os.rmdir(stash)
    return "mount-ns (hidden: " + ", ".join(sorted(blocked)) + ")"


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if event in BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed (no network namespace on this machine)")


def setup(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything before the program; returns the report."""
    root = os.geteuid() == 0
    net, why = enter_network_namespace(cfg["network"], root)
    if net == "none" and cfg["network"] == "netns":
        raise RuntimeError(f"a network namespace is required but unavailable ({why})")
    set_limits(cfg, root)
    fs, user = "host", "same-user"
    if cfg["uid"] is not None:
        fs = expose_python()
        drop_privileges(cfg["uid"])
        user = "uid"
    if net == "none" and cfg["network"] != "off":
        sys.addaudithook(_audit_hook)
        net = "audit-hook"
    report = {"network": net, "user": user, "fs": fs, "ready": True}
    if why:
        report["netns_unavailable"] = why
    return report


def main() -> NoReturn | None:
    cfg = json.loads(sys.argv[1])
    fd = int(sys.argv[2])
    try:
        with open("main.py", encoding="utf-8") as f:
            source = f.read()
        report = setup(cfg)
    except Exception as exc:  # report, then exit without running the program
        os.write(fd, json.dumps({"error": f"sandbox setup failed: {exc!r}"}).encode())
        os.close(fd)
        sys.stderr.write(f"sandbox setup failed: {exc!r}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
    os.write(fd, json.dumps(report).encode())
    os.close(fd)
    sys.argv = ["main.py"]
    sys.path.insert(0, os.getcwd())
    code = compile(source, os.path.join(os.getcwd(), "main.py"), "exec")
    del cfg, source, report
    exec(code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
    return None


if __name__ == "__main__":
    main()
