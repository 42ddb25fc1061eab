"""Watching a benchmark child process: exit code, wall time, peak RSS of its tree and its peak GPU memory."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

POLL_S = 0.05


def peak_rss_mb() -> float:
    """This process image's peak RSS (Linux VmHWM). getrusage's ru_maxrss can carry a large parent's resident set
    over from fork into a child it spawned; VmHWM starts afresh at exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def watch(cmd: list, log: Path) -> tuple[int, float, float, float | None]:
    """Run a command with output to log; (exit code, peak RSS MB incl. children, wall s, peak GPU MB or None)."""
    import psutil

    start, peak, gpu = time.perf_counter(), 0, None
    smi = shutil.which("nvidia-smi")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, _tree_rss(ps))
            if smi:
                used = gpu_memory_mb(_smi_apps(smi), _tree_pids(ps))
                gpu = used if gpu is None else max(gpu, used)
            time.sleep(POLL_S)
    return proc.returncode, peak / 2**20, time.perf_counter() - start, gpu


def watch_json(module: str, *args: str, what: str) -> tuple[dict, float, float]:
    """Run `python -m module --child ARGS... RESULT.json` watched; (its JSON result, peak RSS MB, wall s), or exit
    naming `what` failed with the end of its log."""
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        rc, peak_mb, wall, _ = watch([sys.executable, "-m", module, "--child", *args, str(result)], log)
        if rc != 0:
            raise SystemExit(f"{what} failed ({rc}): {log.read_text()[-2000:]}")
        return json.loads(result.read_text()), peak_mb, wall


def _tree_pids(ps) -> set:
    """PIDs of a process and its children (empty once it is gone)."""
    import psutil

    try:
        return {p.pid for p in [ps, *ps.children(recursive=True)]}
    except psutil.Error:
        return set()


def _smi_apps(smi: str) -> str:
    """nvidia-smi's per-process GPU memory table (pid, used MiB), or '' if it fails."""
    r = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True, timeout=10)
    return r.stdout if r.returncode == 0 else ""


def gpu_memory_mb(table: str, pids: set) -> float:
    """GPU memory used by `pids`, from nvidia-smi's `pid, used_memory` CSV lines."""
    total = 0.0
    for line in table.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            total += float(parts[1]) if parts[1].replace(".", "", 1).isdigit() else 0.0
    return total


def _tree_rss(ps) -> int:
    """RSS of a process and all its children, 0 once it is gone."""
    import psutil

    try:
        return sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
    except psutil.Error:
        return 0
