"""Run model-written Python (HumanEval completions) in a separate, limited process: pass@1.

What is isolated, per program:
- a separate process (`python -I -B`: no user site, no PYTHON* variables, no bytecode written),
  started with an EMPTY environment, in a fresh temporary directory that is deleted afterwards;
- wall-clock time limit (the process group is killed), CPU-time limit (RLIMIT_CPU), address
  space (RLIMIT_AS, `memory_mb`), largest file it may write (RLIMIT_FSIZE, 16 MiB), no core dumps;
- network: when unprivileged user namespaces work (`unshare -rn` succeeds here once), the
  process runs in its own network namespace with no interface but a down loopback, so any
  connection fails with "Network is unreachable"; in any case an audit hook
  (`sys.addaudithook`, installed before the program runs) refuses socket creation / connect /
  bind / name resolution, process creation (fork, exec, spawn, subprocess, os.system), and writes,
  renames or deletions outside the temporary directory.

What is NOT isolated: the audit hook is a guard against accidents, not a security boundary —
code that loads native code (ctypes is refused, but a C extension already installed is not)
can bypass it; reads anywhere the user can read are allowed; without user namespaces the
network guard is the audit hook alone. Run untrusted models' code on a machine or container
you can throw away (HumanEval's own advice).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

# Installed in the child before the program runs. Events: docs.python.org/3/library/audit_events.
_RUNNER = r'''
import os, sys
ROOT = os.path.realpath(os.getcwd())
BLOCKED = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym",
    "ctypes.cdata", "webbrowser.open", "sys.remote_exec",
}
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.replace", "os.mkdir", "os.chmod",
               "os.chown", "os.truncate", "os.symlink", "os.link", "os.utime", "shutil.rmtree",
               "shutil.move", "shutil.copyfile", "shutil.copytree"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    p = os.path.realpath(str(path))
    return p == ROOT or p.startswith(ROOT + os.sep)

def guard(event, args):
    if event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writing and path is not None and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} is not allowed")
    elif event in PATH_EVENTS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                raise PermissionError(f"sandbox: {event} on {a!r} is not allowed")

with open("program.py", encoding="utf-8") as fh:
    SOURCE = fh.read()
sys.addaudithook(guard)
exec(compile(SOURCE, "program.py", "exec"), {"__name__": "__main__"})
'''


@dataclass(frozen=True)
class ExecResult:
    """How one program ended: passed (exit 0), failed (an exception, named), or timeout."""

    passed: bool
    status: str  # "passed" | "timeout" | "failed: <ExceptionName>" | "failed: exit <code>"


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether `unshare -rn` (a new user + network namespace, no root needed) works here."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def isolation() -> str:
    """What the sandbox uses on this machine (recorded with every pass@1 evaluation)."""
    net = "netns+audit-hook" if network_namespace_available() else "audit-hook only"
    return f"subprocess, empty env, temp dir, rlimits, network: {net}"


def _limits(timeout_s: float, memory_mb: int):
    def apply() -> None:  # runs in the child between fork and exec
        import resource

        cpu = int(timeout_s) + 1
        for name, value in (("RLIMIT_CPU", (cpu, cpu + 1)), ("RLIMIT_AS", (memory_mb << 20,) * 2),
                            ("RLIMIT_FSIZE", (16 << 20,) * 2), ("RLIMIT_CORE", (0, 0))):
            limit = getattr(resource, name, None)
            if limit is not None:
                try:
                    resource.setrlimit(limit, value)
                except (ValueError, OSError):
                    pass  # a hard limit already lower than ours stays
    return apply


def run_python(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Execute `program` in the sandbox; passed = it ran to the end without an exception."""
    with tempfile.TemporaryDirectory(prefix="safeanchor-exec-") as tmp:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as fh:
            fh.write(program)
        with open(os.path.join(tmp, "runner.py"), "w", encoding="utf-8") as fh:
            fh.write(_RUNNER)
        cmd = [sys.executable, "-I", "-B", "runner.py"]
        if network_namespace_available():
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        try:
            proc = subprocess.Popen(cmd, cwd=tmp, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=_limits(timeout_s, memory_mb) if os.name == "posix" else None)
        except OSError as e:
            return ExecResult(False, f"failed: cannot start ({e.strerror})")
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.communicate()
            return ExecResult(False, "timeout")
    if proc.returncode == 0:
        return ExecResult(True, "passed")
    if proc.returncode == -signal.SIGXCPU or proc.returncode == -signal.SIGKILL:
        return ExecResult(False, "timeout")
    return ExecResult(False, f"failed: {_exception_name(err.decode('utf-8', 'replace'), proc.returncode)}")


def _exception_name(stderr: str, code: int) -> str:
    for line in reversed(stderr.strip().splitlines()):
        m = re.match(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt))\b", line.strip())
        if m:
            return m.group(1)
    return f"exit {code}"


# ----------------------------------------------------------------------------- HumanEval

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(generation: str) -> str:
    """The code in a chat reply: the first fenced block (an unclosed one, cut off by the token
    limit, runs to the end), else the whole reply."""
    m = _FENCE.search(generation)
    return m.group(1) if m else generation


def humaneval_program(code_prompt: str, generation: str, test: str, entry_point: str) -> str:
    """problem prompt + the model's code + the problem's tests + `check(entry_point)`.

    A reply that defines `entry_point` itself is appended after the prompt (its definition
    replaces the prompt's docstring-only stub; the prompt keeps the imports the model may have
    left out); a reply that is a body only is indented under the prompt's signature."""
    code = extract_code(generation)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, flags=re.M):
        program = f"{code_prompt}\n    pass\n\n{code}"
    else:
        lines = code.splitlines()
        first = next((ln for ln in lines if ln.strip()), "")
        if first and not first[0].isspace():
            code = "\n".join(("    " + ln) if ln.strip() else ln for ln in lines)
        program = f"{code_prompt}{code}"
    return f"{program}\n\n{test}\n\ncheck({entry_point})\n"


def pass_at_1(problems: list[dict[str, str]], generations: list[str], timeout_s: float = 10.0,
              memory_mb: int = 1024, workers: int = 2) -> list[ExecResult]:
    """Execute each generation against its problem (`code_prompt`, `test`, `entry_point`), a few
    sandboxes at a time; greedy decoding gives one sample per problem, so pass@1 = mean(passed)."""
    if len(problems) != len(generations):
        raise ValueError(f"{len(problems)} problems but {len(generations)} generations")
    programs = [humaneval_program(p["code_prompt"], g, p["test"], p["entry_point"])
                for p, g in zip(problems, generations, strict=True)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda prog: run_python(prog, timeout_s, memory_mb), programs))
