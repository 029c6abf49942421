"""Process helpers the reliability tests share: the process tree from /proc, a process's
start time (to tell a reused pid apart), and the child-subreaper prctl."""

from __future__ import annotations

import ctypes
import os

PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37


def children_map() -> dict[int, list[int]]:
    """Parent pid -> its children's pids, read from /proc/*/stat."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(root: int) -> list[int]:
    """Every process below ``root``."""
    children = children_map()
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (None: no such process); tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if option == PR_GET_CHILD_SUBREAPER:
        val = ctypes.c_int(0)
        if libc.prctl(option, ctypes.byref(val), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
        return val.value
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")
    return 0
