"""Run model-written Python in a separate process with a time limit, a memory limit and no network.

    result = run_program(code, timeout=5.0, memory_mb=1024)
    result.passed, result.reason      # True / "passed", or False / "timed out after 5.0 s", ...

What is guaranteed, and how:

- time: the program runs in its own process group, killed whole (SIGKILL) at `timeout` seconds
  of wall time; RLIMIT_CPU is set a little above it as a second line.
- memory: RLIMIT_AS caps the address space at `memory_mb` (allocations beyond it fail with
  MemoryError inside the program); RLIMIT_FSIZE caps any file it writes at 16 MB.
- network, where the kernel allows it (`network_isolation() == "namespace"`): the program runs in
  a new, empty network namespace (`unshare --net`, as root, or `unshare --user --net` where
  unprivileged user namespaces are enabled). It has no interface but a loopback that is down, so
  no packet leaves, whatever the code does (ctypes, subprocess included).
- network, always: before the program's first line, Python's socket constructors are replaced by
  a function that raises. On its own ("socket-blocked", when no namespace can be made) this is
  a guard against ordinary code, not a security boundary: code that loads libc through ctypes,
  or starts another program, gets past it.

The program also runs with `python -I` (no user site, no PYTHON* variables) in an empty
temporary working folder, with a bare environment. This is the isolation that HumanEval's
authors ask for before running model output; it is not a container: the file system stays
readable. Run untrusted code only behind --allow-code-execution, as tool/evaluate.py does.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOCKET_GUARD = '''\
def _etude_no_network(*args, **kwargs):
    raise OSError("network access is disabled in the evaluation sandbox")
import socket as _s, _socket as _ss
for _name in ("socket", "create_connection", "socketpair", "fromfd", "create_server"):
    if hasattr(_s, _name):
        setattr(_s, _name, _etude_no_network)
_ss.socket = _etude_no_network
del _s, _ss, _name
'''


@dataclass(frozen=True)
class RunResult:
    passed: bool
    reason: str


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...] | None:
    """The unshare command that makes a new network namespace here, or None when none works."""
    tool = shutil.which("unshare")
    if tool is None:
        return None
    for flags in (("--net",), ("--user", "--map-root-user", "--net")):
        try:
            done = subprocess.run([tool, *flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return (tool, *flags)
    return None


def network_isolation() -> str:
    """'namespace' (kernel-level: no network at all) or 'socket-blocked' (Python-level guard only)."""
    return "namespace" if _unshare_prefix() else "socket-blocked"


def _limits(memory_mb: int, cpu_seconds: int) -> None:
    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(code: str, timeout: float = 5.0, memory_mb: int = 1024, block_sockets: bool = True,
                namespace: bool = True) -> RunResult:
    """Run `code` as a Python program under the limits above. It passes when it exits with 0
    within the time limit. `block_sockets` and `namespace` exist so the tests can check each
    network barrier alone; leave them on."""
    if sys.platform == "win32":
        raise OSError("the code sandbox needs a POSIX system (process groups, resource limits)")
    with tempfile.TemporaryDirectory(prefix="etude_sandbox_") as workdir:
        program = Path(workdir) / "program.py"
        program.write_text((SOCKET_GUARD if block_sockets else "") + code, encoding="utf-8")
        prefix = _unshare_prefix() if namespace else None
        command = [*(prefix or ()), sys.executable, "-I", str(program)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "LANG": "C.UTF-8"}
        process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                   preexec_fn=functools.partial(_limits, memory_mb, int(timeout) + 2))
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return RunResult(False, f"timed out after {timeout:g} s")
        finally:
            if process.poll() is None:  # never leave a child behind, whatever went wrong above
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if process.returncode == 0:
        return RunResult(True, "passed")
    if process.returncode < 0:
        return RunResult(False, f"killed by {signal.Signals(-process.returncode).name}")
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return RunResult(False, lines[-1][:200] if lines else f"exit status {process.returncode}")
