"""Reading another process's CPU time, RSS and open fds from /proc, and process setup.

The benchmark charges the server only for the CPU it actually burns (utime + stime from
/proc/<pid>/stat), never for wall time, so a slow generator or an idle gap cannot inflate the
per-round-trip cost. Linux only, which is what the benchmark targets.
"""

from __future__ import annotations

import os
import resource

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by `pid` (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of `pid`: one per live socket, so it tracks connection cleanup."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (from /proc/stat), summed over CPUs.

    The benchmark subtracts the server's and the generator's own CPU from this to show how much
    *other* load shared the machine during a measurement, because a busy neighbour changes
    batching and cache behaviour and so the per-round-trip figures.
    """
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (10,000 sockets need it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def pin(pid: int, cpu: int | None) -> bool:
    """Pin `pid` to one CPU, like `taskset -pc`; False if pinning is unavailable."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(pid, {cpu})
    except OSError:
        return False
    return True


def set_nice(pid: int, nice: int | None) -> bool:
    """Set the scheduling priority of `pid` (negative needs root); False if not possible.

    On a shared machine, other work on the server's CPU steals time slices and changes batching;
    a higher priority (e.g. -15) keeps the measured processes on their CPUs.
    """
    if nice is None:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
        # With autogroup scheduling, CFS first shares the CPU evenly between sessions and only
        # then applies nice inside one, so the session's own group needs the priority too.
        # Callers start the process in a new session, so the group holds only that process.
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except FileNotFoundError:
        return True  # no autogroup support: plain nice is all there is
    except OSError:
        return False
    return True
