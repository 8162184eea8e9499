"""Soak probe (how soak_30min_probe.jsonl was made): inside the server, every 30 s, the RSS, glibc's heap in use
and free (mallinfo2), Python's allocated blocks and gc objects, and with PYTHONTRACEMALLOC the tracemalloc growth.

    PROBE_SOAK=1 PROBE_DIR=/tmp/probe PYTHONPATH=benchmarks/soak_probe python benchmarks/overload.py ...

Python imports this file at start in every process (it is `sitecustomize`); it records only in the process that
imports `pabee.server`, into $PROBE_DIR/probe-<pid>.jsonl.
"""

import os
import sys
import threading

MALLINFO2 = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


def _mallinfo2():
    """glibc's mallinfo2, returning its struct; None where libc has none."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in MALLINFO2]

    mallinfo2 = getattr(ctypes.CDLL("libc.so.6"), "mallinfo2", None)
    if mallinfo2 is not None:
        mallinfo2.restype = Mallinfo2
    return mallinfo2


def _sample(mallinfo2, first):
    """One row of the probe, and the first tracemalloc snapshot (taken now if there is none yet)."""
    import gc
    import time
    import tracemalloc

    with open(f"/proc/{os.getpid()}/status") as status:
        rss = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
    row = {
        "t": time.time(),
        "rss_mb": rss,
        "py_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
        "threads": threading.active_count(),
    }
    if mallinfo2 is not None:
        m = mallinfo2()
        row |= {
            "heap_mb": m.arena / 2**20,
            "mmap_mb": m.hblkhd / 2**20,
            "inuse_mb": m.uordblks / 2**20,
            "free_mb": m.fordblks / 2**20,
            "top_pad_mb": m.keepcost / 2**20,
        }
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        row["traced_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        if first is None:
            first = snap
        else:
            row["top_growth"] = [str(s) for s in snap.compare_to(first, "lineno")[:8]]
    return row, first


def _run():
    import json
    import time

    for _ in range(600):
        if "pabee.server" in sys.modules:
            break
        time.sleep(0.5)
    else:
        return
    path = os.path.join(os.environ.get("PROBE_DIR", "/tmp/probe"), f"probe-{os.getpid()}.jsonl")
    out = open(path, "a")  # noqa: SIM115 (open for the process's life)
    mallinfo2, first = _mallinfo2(), None
    while True:
        time.sleep(30)
        row, first = _sample(mallinfo2, first)
        out.write(json.dumps(row) + "\n")
        out.flush()


if os.environ.get("PROBE_SOAK"):
    threading.Thread(target=_run, daemon=True, name="soak-probe").start()
