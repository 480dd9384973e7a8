"""Wall time and peak resident memory of a child process: what the data benchmarks measure.

    from tool.measure import run_measured
    result = run_measured([sys.executable, "tool/cut_txt.py", ...], log=Path("run.log"))
    result["seconds"], result["peak_rss_mb"], result["polled_hwm_mb"], result["rc"]

Peak memory is taken two ways. ru_maxrss from os.wait4 is the kernel's high-water mark of the
child; on Linux it also counts what the child inherited at fork from the measuring process (the
mark survives exec), so it can only overstate, and the measuring process should stay small and
report its own peak (`own_peak_mb`) as the floor. VmHWM polled from /proc every 50 ms cannot
overstate, but can miss a spike in the last 50 ms. Standard library only, so that a tool importing
it stays small.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

POLL_S = 0.05


def status_kb(pid: int | str, field: str) -> int:
    """A memory field (VmRSS, VmHWM) of /proc/<pid>/status in kB; 0 once the process is gone
    (or where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def own_peak_mb() -> float:
    """This process's own peak resident memory in MB: the floor of every child's ru_maxrss."""
    return status_kb("self", "VmHWM") / 1024


def run_measured(command: list[str], log: Path, cwd: Path | str | None = None, timeout_s: float = 0,
                 kill_above_mb: float = 0) -> dict:
    """Run `command` with its stdout and stderr going to `log`; return its exit status (`rc`),
    wall `seconds`, `cpu_seconds` (user + system, all its threads: less swayed than wall time by
    other work on a shared machine), `peak_rss_mb` (ru_maxrss) and `polled_hwm_mb` (VmHWM), and `stopped`: why it
    was killed, if it was — after `timeout_s` seconds, or once its resident memory passed
    `kill_above_mb` (0: no such limit), so that a runaway child cannot take a shared machine down."""
    start = time.perf_counter()
    polled, stopped, killed = 0, "", False
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            polled = max(polled, status_kb(process.pid, "VmHWM"))
            if not stopped and timeout_s and time.perf_counter() - start > timeout_s:
                stopped = f"killed after {timeout_s:g} s (the time limit)"
            if not stopped and kill_above_mb and status_kb(process.pid, "VmRSS") / 1024 > kill_above_mb:
                stopped = f"killed at {kill_above_mb:.0f} MB resident (the memory limit)"
            if stopped and not killed:
                os.kill(process.pid, signal.SIGKILL)  # the next wait4 reaps it
                killed = True
            time.sleep(POLL_S)
    process.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    seconds = time.perf_counter() - start
    return {"rc": process.returncode, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "polled_hwm_mb": polled / 1024, "stopped": stopped, "log": str(log)}
