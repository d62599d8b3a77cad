"""A sandbox for untrusted programs (model-written code run against its tests): resource limits
always; where the machine allows (root, `unshare`), also its own network and mount namespaces, a
read-only filesystem but its working directory, and a fresh uid whose processes are all killed."""

from __future__ import annotations

import ctypes
import functools
import glob
import itertools
import math
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

LIMITS = {resource.RLIMIT_AS: 1 << 30, resource.RLIMIT_FSIZE: 8 << 20, resource.RLIMIT_CORE: 0}
NPROC = 16  # processes (threads count) the child's user may run: a fork bomb stops there (16 x RLIMIT_AS)
OUTPUT_CHARS = 1000  # of the output kept in a failure's reason
UID_BASE = 2_000_000_000  # a fresh, unused uid per run: far above real users, as kill(-1) ends all of its processes
_uids = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWNET, PR_SET_NO_NEW_PRIVS = 0x20000, 0x40000000, 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18


def _mount(source: bytes | None, target: bytes, flags: int, fstype: bytes | None = None, data: bytes | None = None):
    if _libc.mount(source, target, fstype, flags, data) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target.decode()}: {os.strerror(ctypes.get_errno())}")


@functools.cache
def _mount_plan() -> tuple[list[tuple[bytes, int]], list[tuple[bytes, list[bytes]]]]:
    """Computed once, in the parent: the mount points to make read-only (with the flags a remount must
    keep), and the directories that hide the interpreter from other users (e.g. /root, mode 0700), each
    with the interpreter's directories under it."""
    readonly = []
    for line in open("/proc/self/mountinfo", encoding="utf-8"):
        fields = line.split()
        options = fields[5].split(",")
        keep = sum(flag for name, flag in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC))
                   if name in options)
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4].encode())  # \040: a space
        readonly.append((point, keep))
    needed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable))}
    needed = [p for p in needed if not any(p.startswith(q + "/") for q in needed)]  # bind the outermost only
    hidden: dict[str, list] = {}
    for path in sorted(needed):
        parts = path.split("/")
        for depth in range(2, len(parts) + 1):
            ancestor = "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                hidden.setdefault(ancestor, []).append(path.encode())
                break
    return readonly, [(ancestor.encode(), dirs) for ancestor, dirs in hidden.items()]


def _isolate(work: bytes, plan) -> None:
    """In the child, still root: own mount and network namespaces where only `work` is writable."""
    readonly, hidden = plan
    if _libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    _mount(None, b"/", MS_REC | MS_PRIVATE)  # nothing mounted below shows outside
    _mount(work, work, MS_BIND)  # its own mount, left writable when the rest turns read-only
    os.chdir(work)  # the working directory was set before: move onto the new mount
    for ancestor, dirs in hidden:  # an empty tmpfs over e.g. /root, with only the interpreter bound back
        # Held open across the tmpfs mount; opened here, as a bind's source must be in this namespace.
        fds = [os.open(path, os.O_PATH) for path in dirs]
        _mount(b"tmpfs", ancestor, 0, b"tmpfs", b"mode=755,size=64k")
        for path, fd in zip(dirs, fds):
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}".encode(), path, MS_BIND | MS_REC)
    shadowed = tuple(ancestor + b"/" for ancestor, _ in hidden)
    extra = [(ancestor, 0) for ancestor, _ in hidden] + [(path, 0) for _, dirs in hidden for path in dirs]
    for point, keep in readonly + extra:
        try:
            _mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            if not point.startswith(shadowed):  # a mount under a hidden directory is unreachable anyway
                raise


def _child_setup(timeout: float, nproc: int, work: bytes, uid: int | None, plan) -> None:
    """Runs in the child between fork and exec (keep it to system calls: the parent has threads)."""
    cpu = math.ceil(timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    for limit, value in LIMITS.items():
        resource.setrlimit(limit, (value, value))
    if uid is not None:
        _isolate(work, plan)
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary gives privileges back
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _tasks_of(uid: int) -> int:
    """Processes and threads of `uid` (what RLIMIT_NPROC counts), for a child that keeps our uid."""
    count = 0
    for path in glob.glob("/proc/[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in open(path, encoding="utf-8"))
            count += int(fields["Threads"]) if int(fields["Uid"].split()[0]) == uid else 0
        except (OSError, ValueError, KeyError):
            continue  # it exited meanwhile
    return count


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """End the child and everything it started: as its uid, kill(-1) reaches processes that left the session."""
    if uid is not None:
        if (pid := os.fork()) == 0:
            try:
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit status, or None at the timeout. A pidfd wakes us at once; Popen.wait(timeout) polls (50 ms)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # before Linux 5.3
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
    try:
        return proc.wait() if select.select([fd], [], [], timeout)[0] else None
    finally:
        os.close(fd)


def _run(program: str, timeout: float, isolated: bool) -> tuple[bool, str]:
    uid = UID_BASE + next(_uids) % 1_000_000 if isolated else None
    plan = _mount_plan() if isolated else None
    nproc = NPROC if isolated else _tasks_of(os.getuid()) + NPROC
    with tempfile.TemporaryDirectory(prefix="lacuna-humaneval-", ignore_cleanup_errors=True) as base:
        os.chmod(base, 0o711)  # others may pass through to `work`, not list or write
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as file:
            file.write(program)
        if uid is not None:
            os.chown(work, uid, uid)
        # -S: no site-packages; HumanEval needs only the standard library, and site's .pth hooks (third-party
        # code) take longer than the rest of a run. Output goes to a file outside `work`, capped by
        # RLIMIT_FSIZE: a pipe could fill the evaluator's memory, or hang on a grandchild holding it open.
        with open(os.path.join(base, "output"), "w+b") as output:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "program.py"], cwd=work, stdin=subprocess.DEVNULL, stdout=output,
                    stderr=subprocess.STDOUT, start_new_session=True, env={"PATH": "/usr/bin:/bin", "TMPDIR": "."},
                    preexec_fn=functools.partial(_child_setup, timeout, nproc, work.encode(), uid, plan))
            except (OSError, subprocess.SubprocessError) as err:
                return False, f"sandbox setup failed: {err}"
            try:
                code = _wait(proc, timeout)
            finally:
                _kill_all(proc, uid)
            output.seek(0, os.SEEK_END)
            output.seek(max(0, output.tell() - OUTPUT_CHARS))
            tail = output.read().decode("utf-8", "replace").strip()
    if code == 0:
        return True, "passed"
    what = (f"timed out after {timeout:g} s" if code is None else f"exit {code}" if code > 0
            else f"killed by {signal.Signals(-code).name}")  # SIGXCPU: CPU limit, SIGXFSZ: file size limit
    return False, f"{what}: {tail}" if tail else what


@functools.cache
def isolation() -> tuple[bool, str]:
    """(whether programs run fully isolated, how): namespaces and a spare uid need root and a working
    `unshare --net`; tried once on a trivial program."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False, "resource limits only: no network or filesystem isolation (needs root and unshare)"
    if subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True).returncode != 0:
        return False, "resource limits only: `unshare --net --mount` fails here, no network or filesystem isolation"
    passed, reason = _run("pass", 10.0, True)
    if not passed:
        return False, f"resource limits only: the isolated sandbox failed here ({reason})"
    return True, "isolated: own network and mount namespaces, read-only filesystem but its directory, own uid"


def run_program(program: str, timeout: float = 5.0) -> tuple[bool, str]:
    """Run `program` sandboxed; (passed, reason). Passed: it exited 0 within `timeout` seconds."""
    isolated, how = isolation()
    passed, reason = _run(program, timeout, isolated)
    return passed, reason if isolated else f"{reason} [{how}]"


def run_programs(programs: list[str], timeout: float = 5.0, workers: int | None = None) -> list[tuple[bool, str]]:
    isolation()  # probe once, before the workers race to
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(functools.partial(run_program, timeout=timeout), programs))
