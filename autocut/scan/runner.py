"""Run a check (by default :func:`autocut.scan.check.check_model`) over many zoo models, each in
isolation, and keep going whatever a model does.

``jobs`` long-lived worker processes (:mod:`autocut.scan.worker`) import torch, timm and autocut
once, then fork a fresh child per model: a model runs in isolation (its own ``ru_maxrss``, a memory
limit set with ``resource.setrlimit``), without paying for the imports again. A model that runs
past the timeout is killed, one that crashes the interpreter is recorded with its signal, and the
scan goes on; a worker process that dies itself is replaced.

Records are appended to ``results.jsonl`` as they come; a scan started again on the same folder
skips the names already recorded (``retry=`` re-runs some statuses), so an interrupted scan
resumes where it stopped.

Example:
    >>> scan(zoo_names("torchvision", ["resnet18", "squeezenet*"]), "scan-out", jobs=2)
    {'ok': 3}
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import platform
import selectors
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocut._validate import POSITIVE, POSITIVE_INT

ZOOS = ("timm", "torchvision", "transformers", "all")

__all__ = ["scan", "zoo_names", "cpu_model", "ZOOS", "family_of", "load_results", "read_jsonl", "output_folder", "carry_values",
           "RESULTS", "RUNS", "FAILED_STATUSES"]

RESULTS = "results.jsonl"
RUNS = "scan_runs.jsonl"
WORKER_LOG = "workers.log"
FAILED_STATUSES = ("failed", "timeout", "crashed", "oom")


# --- names ------------------------------------------------------------------------------------


def zoo_names(zoo: str = "all", filters: Iterable[str] = ()) -> list[str]:
    """Zoo names to scan: every ``timm.list_models()`` name, every torchvision classification
    model (as ``torchvision:NAME``) and every transformers model type of the image-classification
    and backbone mappings (as ``transformers:TYPE``), kept when the bare or full name matches a
    glob of ``filters``.
    """
    from autocut import zoo as zoo_

    if zoo not in ZOOS:
        raise ValueError(f"zoo must be one of {', '.join(map(repr, ZOOS))}, got {zoo!r}")
    names: list[str] = []
    if zoo in ("timm", "all"):
        names += list(zoo_.timm_names())
    if zoo in ("torchvision", "all"):
        names += [f"torchvision:{n}" for n in zoo_.torchvision_names()]
    if zoo in ("transformers", "all"):
        names += list(zoo_.transformers_names())  # none without transformers installed
    filters = list(filters)
    if filters:
        names = [n for n in names
                 if any(fnmatch.fnmatchcase(n, f) or fnmatch.fnmatchcase(n.rpartition(":")[2], f) for f in filters)]
    return names


def family_of(name: str) -> tuple[str, str]:
    """``(zoo, family)``: the timm model module (``"resnet"``, ``"vision_transformer"``) or the
    torchvision model module a name is defined in."""
    source, _, bare = name.rpartition(":")
    try:
        if source == "transformers":
            return "transformers", bare  # a model type is its own family
        if source == "torchvision":
            import torchvision

            return "torchvision", torchvision.models.get_model_builder(bare).__module__.rsplit(".", 1)[-1]
        import timm

        return "timm", timm.models.model_entrypoint(bare).__module__.rsplit(".", 1)[-1]
    except Exception:
        return (source or "timm"), "?"


NOT_JSON = "not JSON"


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """``(line number, record, problem)`` for every non-blank line of a JSON-lines file; the one
    reader of ``results.jsonl`` and ``scan_runs.jsonl``.

    ``problem`` is ``""`` for a good line, else what is wrong with it: not UTF-8 (``record`` is
    then what the line still says with its bad bytes replaced, or ``None``), :data:`NOT_JSON`
    (a line cut short by a kill while it was written, most likely), or not an object.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            problem = ""
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                text, problem = raw.decode("utf-8", errors="replace"), f"not UTF-8 ({err.reason} at byte {err.start})"
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as err:
                yield number, None, problem or f"{NOT_JSON} ({err.msg})"
                continue
            if not isinstance(rec, dict):
                yield number, None, problem or f"a JSON {type(rec).__name__}, not an object"
                continue
            yield number, rec, problem


def load_results(out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The records of ``out/results.jsonl``, the last one per name.

    A damaged line (not UTF-8, a record without a name or a ``status``) is left out with a
    warning naming the file and the line; the model it recorded, when its name can still
    be read, counts as not checked (a scan checks it again). A line that is not JSON, cut short
    by a kill while it was written, is left out quietly: its model was never recorded.
    """
    path = Path(out) / RESULTS
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    for number, rec, problem in read_jsonl(path):
        name = rec.get("name") if rec is not None and isinstance(rec.get("name"), str) else None
        if not problem and name is None:
            problem = "a record without a name"
        elif not problem and not (isinstance(rec.get("status"), str) and rec["status"]):
            problem = "a record without a status"
        if not problem:
            records[name] = rec
            continue
        if name is not None:
            records.pop(name, None)  # whatever an earlier line said, this model is checked again
        if not problem.startswith(NOT_JSON):
            again = f"{name} will be checked again" if name else "no model name can be read from it"
            warnings.warn(f"{path}:{number}: skipped a damaged line ({problem}); {again}", stacklevel=2)
    return records


def output_folder(out: str | os.PathLike, create: bool = False) -> Path:
    """``out`` as the scan's folder (made with ``create``).

    Raises:
        ValueError: ``out`` is a file, or (without ``create``) no folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: pass the scan's folder (new, or one to resume)")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    elif not out.is_dir():
        raise ValueError(f"--out {out}: no such folder: pass the folder of a scan")
    return out


# --- the pool ---------------------------------------------------------------------------------


def _check_path(check: Callable[[str], dict] | str | None) -> str:
    if check is None:
        return "autocut.scan.check:check_model"
    if isinstance(check, str):
        return check
    return f"{check.__module__}:{check.__qualname__}"


@dataclass
class _Worker:
    """A :mod:`autocut.scan.worker` process: names in on stdin, records out on stdout."""

    proc: subprocess.Popen
    name: str | None = None
    sent: float = 0.0
    ready: bool = False


@dataclass
class _Pool:
    command: list[str]
    env: dict[str, str]
    timeout: float
    workers: list[_Worker] = field(default_factory=list)

    def start(self) -> _Worker:
        proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env,
                                start_new_session=True)  # ^C reaches the scan only; it stops the workers
        worker = _Worker(proc)
        self.workers.append(worker)
        return worker

    def send(self, worker: _Worker, name: str) -> None:
        worker.proc.stdin.write((name + "\n").encode())
        worker.proc.stdin.flush()
        worker.name, worker.sent = name, time.monotonic()

    def stop(self, worker: _Worker) -> None:
        """An idle worker exits when its stdin closes; a busy one is terminated with its child."""
        for close in (worker.proc.stdin.close, worker.proc.stdout.close):
            try:
                close()
            except OSError:
                pass
        try:
            worker.proc.wait(timeout=0 if worker.name is not None else 2)
        except subprocess.TimeoutExpired:
            worker.proc.terminate()
            try:
                worker.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
        if worker in self.workers:
            self.workers.remove(worker)

    def shutdown(self) -> None:
        for worker in list(self.workers):
            self.stop(worker)

    def overdue(self, worker: _Worker) -> bool:
        # the worker enforces the timeout; this catches a worker that itself stopped answering
        return worker.name is not None and time.monotonic() - worker.sent > self.timeout + 60


def _worker_died(worker: _Worker) -> dict[str, Any]:
    code = worker.proc.poll()
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with code {code}"
    return {"status": "crashed", "phase": "worker", "error_class": "WorkerDied", "error": f"the scan worker process was {how}"}


# --- progress ---------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar on a terminal; a line every 30 s elsewhere (logs, CI)."""

    def __init__(self, total: int, done_before: int, enabled: bool):
        self.counts = {"ok": 0, "differs": 0, "mismatch": 0, "failed": 0}
        self.total, self.done, self.enabled = total, 0, enabled
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]scan[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[green]{task.fields[ok]} ok[/] [cyan]{task.fields[differs]} differs[/] "
                           "[yellow]{task.fields[mismatch]} mismatch[/] [red]{task.fields[failed]} failed[/]"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            )
            self.task = self.bar.add_task("scan", total=total, **self.counts)
            self.bar.start()
        if done_before:
            self.console.print(f"resuming: {done_before} models already recorded, {total} to go")

    def update(self, status: str) -> None:
        key = status if status in self.counts else "failed"
        self.counts[key] += 1
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, advance=1, **self.counts)
        elif time.monotonic() - self.last_line > 30 or self.done == self.total:
            self.last_line = time.monotonic()
            elapsed = time.monotonic() - self.started
            eta = elapsed / self.done * (self.total - self.done)
            self.console.print(f"scan {self.done}/{self.total}  " + "  ".join(f"{v} {k}" for k, v in self.counts.items())
                               + f"  elapsed {elapsed:.0f}s  ETA {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the scan ---------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "timm", "autocut"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for reports that compare timings across machines."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# what a record's cut is: a later record with all of these equal has the same body
_SAME_CUT = ("status", "where", "nf", "layout", "feature_shape", "stride", "prefix_tokens", "input_size", "groups")


def carry_values(before: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """``rec``, with the values ``before`` compared (``--values``) where ``rec`` compared none and
    its cut is the same (:data:`_SAME_CUT`): a later scan without ``--values`` keeps what was
    verified; ``values_from`` says when it was compared."""
    if "values" in rec or "values" not in before or any(rec.get(k) != before.get(k) for k in _SAME_CUT):
        return rec
    carried = {k: v for k, v in before.items() if k.startswith("values")}
    return {**rec, **carried, "values_from": before.get("values_from") or before.get("at")}


def scan(
    names: Iterable[str],
    out: str | os.PathLike,
    *,
    jobs: int = 2,
    timeout: float = 300.0,
    memory_limit_gb: float | None = 6.0,
    retry: Iterable[str] = (),
    check: Callable[[str], dict] | str | None = None,
    progress: bool = True,
    argv: list[str] | None = None,
    recheck: Callable[[dict], bool] | None = None,
) -> dict[str, int]:
    """Check every name in isolation; append records to ``out/results.jsonl``.

    Args:
        names: zoo names (see :func:`zoo_names`).
        out: the output folder; names already recorded there are skipped (resume).
        jobs: models checked at once (one worker process each), 1 or more.
        timeout: seconds one model may take before its process is killed (status ``timeout``).
        memory_limit_gb: address space a model's process may add to what the warm worker maps
            (``RLIMIT_AS``), above 0; a model that needs more is recorded as ``oom``. ``None``:
            no limit.
        retry: statuses to check again (``"failed"``, ``"timeout"``, ...) instead of skipping.
        check: ``name -> record``, a module-level function or ``"module:function"``, importable
            by the worker; default :func:`autocut.scan.check.check_model`.
        progress: show a progress bar (stderr).
        argv: the command line, recorded in ``out/scan_runs.jsonl``.
        recheck: records for which this says yes are checked again (a ``--values`` scan over
            records that have no values yet, records of an autocut without pyramids); where the
            check then dies, the record is kept, with ``recheck_failed`` saying how it died.

    Returns:
        Counts of this run's records by status.

    Raises:
        ValueError: ``jobs``, ``timeout`` or ``memory_limit_gb`` out of range, or ``out`` a file.
        KeyboardInterrupt: after stopping the workers; the records so far are kept, and the same
        call resumes.
    """
    POSITIVE_INT.check("jobs", jobs)
    POSITIVE.check("timeout", timeout)
    if memory_limit_gb is not None:
        POSITIVE.check("memory_limit_gb", memory_limit_gb)
    out = output_folder(out, create=True)
    done = load_results(out)
    retry = set(retry)
    names = list(dict.fromkeys(names))
    todo = [n for n in names if n not in done or done[n].get("status") in retry or (recheck is not None and recheck(done[n]))]
    command = [sys.executable, str(Path(__file__).with_name("worker.py")), "--check", _check_path(check),
               "--timeout", str(timeout), "--log", str(out / WORKER_LOG)]
    if memory_limit_gb:
        command += ["--memory-limit-gb", str(memory_limit_gb)]
    # the workers import what this process can (the check may live in a test folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p or os.curdir) for p in sys.path)}
    pool = _Pool(command, env, timeout)
    counts: dict[str, int] = {}
    run = {
        "argv": argv, "started": datetime.datetime.now().isoformat(timespec="seconds"), "names": len(names),
        "todo": len(todo), "jobs": jobs, "timeout": timeout, "memory_limit_gb": memory_limit_gb,
        "cpus": os.cpu_count(), "cpu_model": cpu_model(), "load_avg_start": round(os.getloadavg()[0], 2),
        "versions": _versions(), "platform": platform.platform(),
    }
    began = time.monotonic()
    pending = list(reversed(todo))
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted, failed_starts = False, 0
    bar = _Progress(len(todo), len(names) - len(todo), progress)
    selector = selectors.DefaultSelector()
    results = open(out / RESULTS, "a")
    if results.tell() and (out / RESULTS).read_bytes()[-1:] != b"\n":
        results.write("\n")  # a line cut short by a hard kill stays alone, and is skipped

    def record(name: str, rec: dict[str, Any]) -> None:
        before = done.get(name)
        if recheck is not None and before is not None and recheck(before) and rec.get("status") in FAILED_STATUSES:
            # a re-check that died (memory, time) keeps what the record verified before, and says so
            rec = {**before, "recheck_failed": f"{rec.get('status')}: {rec.get('error', '')[:300]}"}
        elif before is not None:
            rec = carry_values(before, rec)
        zoo, family = family_of(name)
        rec = {"name": name, "zoo": zoo, "family": family, **{k: v for k, v in rec.items() if k != "name"},
               "at": datetime.datetime.now().isoformat(timespec="seconds")}
        results.write(json.dumps(rec) + "\n")
        results.flush()
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        bar.update(rec["status"])

    def restart(worker: _Worker, rec: dict[str, Any] | None) -> None:
        name = worker.name
        selector.unregister(worker.proc.stdout)
        pool.stop(worker)
        if name is not None and rec is not None:
            record(name, rec)

    try:
        while pending or any(w.name for w in pool.workers):
            while len(pool.workers) < min(jobs, len(pending) + sum(w.name is not None for w in pool.workers)):
                worker = pool.start()
                selector.register(worker.proc.stdout, selectors.EVENT_READ, worker)
            for worker in pool.workers:
                if worker.ready and worker.name is None and pending:
                    pool.send(worker, pending.pop())
            for key, _ in selector.select(timeout=5):
                worker = key.data
                line = worker.proc.stdout.readline()
                if not line:  # the worker process died
                    if not worker.ready:
                        failed_starts += 1
                        if failed_starts >= 3:
                            raise RuntimeError(f"scan workers die on start: see {out / WORKER_LOG}")
                    restart(worker, _worker_died(worker))
                    continue
                rec = json.loads(line)
                if "ready" in rec:
                    worker.ready = True
                    continue
                name, worker.name = worker.name, None
                record(name, rec)
            for worker in list(pool.workers):
                if pool.overdue(worker):
                    restart(worker, {"status": "timeout", "phase": "worker", "error_class": "Timeout",
                                     "error": "the scan worker stopped answering and was killed"})
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        bar.close()
        pool.shutdown()
        selector.close()
        results.close()
        run.update(finished=datetime.datetime.now().isoformat(timespec="seconds"),
                   wall_s=round(time.monotonic() - began, 1), counts=counts, interrupted=interrupted,
                   load_avg_end=round(os.getloadavg()[0], 2))
        with open(out / RUNS, "a") as f:
            f.write(json.dumps(run) + "\n")
    return counts
