"""A scan worker: one long-lived Python that imports torch, timm and autocut once, then forks a
fresh child per model, so each model runs in isolation without paying for the imports again.

    python autocut/scan/worker.py --check autocut.scan.check:check_model --timeout 300 --memory-limit-gb 6 --log LOG

reads one model name per line on stdin and writes one JSON record per line on stdout. The child
runs ``check(name)`` under ``RLIMIT_AS`` (the memory limit, above what the warm process already
maps); a child that runs past the timeout is killed (``timeout``), one that dies is recorded with
its signal (``crashed``). Its peak memory is its own ``ru_maxrss`` (``os.wait4``). Anything the
models print goes to ``--log``, never into the records.

The file uses the standard library only and runs as a script: what it imports is the check's
module (``autocut.scan.check`` imports torch, timm and autocut), so a check that needs none of
them (the tests' fakes) starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import importlib
import json
import os
import resource
import select
import signal
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["address_space_left", "main", "resolve_check", "run_one", "error_record", "is_out_of_memory"]

_KILLED_BY_LIMIT = "the kernel's OOM killer?"


def resolve_check(path: str) -> Callable[[str], dict]:
    """``"package.module:function"`` -> the function."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"--check must be module:function, got {path!r}")
    return getattr(importlib.import_module(module), name)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (Python's, or torch's allocator's)."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or any(
        s in text for s in ("can't allocate memory", "cannot allocate memory", "out of memory", "std::bad_alloc"))


def error_record(phase: str, err: BaseException) -> dict[str, Any]:
    """``status`` (``oom`` or ``failed``), ``phase``, ``error_class`` and a bounded ``error``."""
    message = str(err).strip() or repr(err)
    return {"status": "oom" if is_out_of_memory(err) else "failed", "phase": phase,
            "error_class": type(err).__name__, "error": message[:1500]}


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def address_space_left() -> int | None:
    """Bytes this process may still map under its ``RLIMIT_AS`` (the scan's memory limit), or
    ``None`` without one."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    mapped = _status_kb("VmSize")
    if limit == resource.RLIM_INFINITY or mapped is None:
        return None
    return max(limit - mapped * 1024, 0)


def _error(status: str, error_class: str, error: str, phase: str = "worker") -> dict[str, Any]:
    return {"status": status, "phase": phase, "error_class": error_class, "error": error}


def _child(check: Callable[[str], dict], name: str, fd: int, memory_limit: int | None) -> None:
    """In the forked child: run the check, write its record to ``fd``, never return."""
    code = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        base = _status_kb("VmRSS")
        if memory_limit:
            mapped = (_status_kb("VmSize") or 0) * 1024  # torch maps GBs of libraries: limit what is added
            resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_limit, mapped + memory_limit))
        try:
            rec = check(name)
        except BaseException as err:  # the check's own bug, or a MemoryError outside its guards
            rec = error_record("check", err)
        rec["base_mb"] = round(base / 1024, 1) if base else None
        data = (json.dumps(rec) + "\n").encode()
        while data:
            data = data[os.write(fd, data):]
    except BaseException:
        code = 3
    finally:
        os._exit(code)


def run_one(
    check: Callable[[str], dict], name: str, timeout: float, memory_limit: int | None, stdin_fd: int | None = None
) -> dict[str, Any]:
    """Check ``name`` in a forked child; the record, with the child's ``peak_mb`` and ``seconds``."""
    r, w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(check, name, w, memory_limit)
    os.close(w)
    chunks: list[bytes] = []
    rec: dict[str, Any] | None = None
    deadline = started + timeout
    poller = select.poll()
    poller.register(r, select.POLLIN | select.POLLHUP)
    if stdin_fd is not None:  # the scan never writes while a model runs: a hang-up means it is gone
        poller.register(stdin_fd, select.POLLHUP)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                rec = _error("timeout", "Timeout", f"no result after {timeout:g} s: the worker was killed")
                break
            events = dict(poller.poll(left * 1000))
            if stdin_fd in events and events[stdin_fd] & (select.POLLHUP | select.POLLERR):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise SystemExit(0)
            if r in events:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - started
    if rec is None:
        try:
            rec = json.loads(b"".join(chunks))
        except ValueError:
            if os.WIFSIGNALED(status):
                sig = signal.Signals(os.WTERMSIG(status)).name
                extra = f" ({_KILLED_BY_LIMIT})" if sig == "SIGKILL" else ""
                rec = _error("crashed", "WorkerDied", f"the worker was killed by {sig}{extra}")
            else:
                rec = _error("crashed", "WorkerDied", f"the worker exited with code {os.WEXITSTATUS(status)} without a record")
    rec["peak_mb"] = round(usage.ru_maxrss / 1024, 1)
    rec["seconds"] = round(seconds, 3)
    return rec


def _warm(check: Callable[[str], dict], names: list[str]) -> None:
    """Load what tracing imports lazily (fx, fake tensors, sympy) before forking."""
    for name in names:
        try:
            check(name)
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autocut.scan.worker")
    parser.add_argument("--check", default="autocut.scan.check:check_model")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--memory-limit-gb", type=float, default=None)
    parser.add_argument("--log", default=os.devnull)
    parser.add_argument("--warm", nargs="*", default=["test_resnet", "torchvision:squeezenet1_1"])
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scan handles ^C and stops us
    # stopped by the scan: take the running child along (the worker leads its own process group)
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL))
    out = os.fdopen(os.dup(1), "w", buffering=1)  # records only; models' prints go to the log
    log = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    faulthandler.enable(file=sys.stderr)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one model per core
    check = resolve_check(args.check)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if args.check in ("autocut.scan.check:check_model", "autocut.scan.check:check_model_values"):
        _warm(check, args.warm)
    gc.collect()
    gc.freeze()  # forked children then copy fewer pages
    limit = int(args.memory_limit_gb * 2**30) if args.memory_limit_gb else None
    stdin = sys.stdin.fileno()
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    buffered = b""
    while True:
        while b"\n" not in buffered:
            chunk = os.read(stdin, 4096)
            if not chunk:
                return 0
            buffered += chunk
        line, buffered = buffered.split(b"\n", 1)
        name = line.decode().strip()
        if not name:
            continue
        print(f"[{os.getpid()}] {name}", flush=True)
        rec = run_one(check, name, args.timeout, limit, stdin_fd=stdin)
        out.write(json.dumps({"name": name, **rec}) + "\n")


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # run as a script: our siblings (check.py, cli.py) must not shadow other modules
    raise SystemExit(main())
