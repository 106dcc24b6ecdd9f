"""Checkpoints that never need unpickling: tensors in safetensors, everything else in JSON.

A run's folder holds

- ``model.safetensors`` + ``model.json``: the weights, and what it takes to rebuild the model
  around them (arch, cut, head options, classes, input size, normalisation). :func:`load_model`
  builds the model with random weights from the JSON, then loads the tensors.
- ``state.safetensors``: what ``--resume`` needs, in one file: the weights at the last finished
  epoch, the optimiser's tensors, and (as JSON in the file's metadata) the optimiser's param
  groups, the scheduler's state, the run's options and its history.

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash
or Ctrl-C never leaves half a checkpoint; the temporary file a killed process leaves behind is
removed by the next run in that folder (:func:`prepare_out`).

Each kind of file is read in one place (:func:`_read_json` for the JSON, :func:`_read_safetensors`
for the tensors, :func:`load_weights` to put them into a model): a damaged or mismatched file is
refused with a ``ValueError`` that names it, says what is wrong with it and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocut.errors import first_line

__all__ = [
    "MODEL_WEIGHTS",
    "MODEL_META",
    "STATE",
    "save_model",
    "load_model",
    "load_weights",
    "read_meta",
    "save_state",
    "load_state",
    "prepare_out",
    "cut_from_dict",
]

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
STATE = "state.safetensors"
FORMAT = "autocut.finetune/1"


# what the model's JSON must hold to rebuild the model
_MODEL_KEYS = ("arch", "cut", "n_in", "head_options", "classes", "input_size", "normalization")
# what a JSON that does not describe the weights beside it differs in
_IDENTITY = ("arch", "classes", "cut", "n_in", "input_size", "head_options", "task")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then move ``tmp`` over ``path`` (flushed to disk first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # own contiguous CPU copies: safetensors refuses tensors that share storage (tied weights)
    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(plain, str(tmp), metadata=metadata))


def _save_json(path: Path, record: dict[str, Any]) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively; JSON keeps floats exact (shortest round-trip repr)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        raise TypeError("tensors go into the safetensors file, not the JSON")
    return value


# --- reading: one place per kind of file ------------------------------------------------------


def _parse_record(text: str, source: Path, fix: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An autocut JSON record from ``text`` (read from ``source``), checked; else a ``ValueError``
    naming ``source``, what is wrong, and ``fix``."""
    try:
        record = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{source} is damaged: not valid JSON ({err}); {fix}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{source} is not an autocut finetune checkpoint (format {found!r}, expected {FORMAT!r}); {fix}")
    if missing := [k for k in required if k not in record]:
        raise ValueError(f"{source} is damaged: it lacks {', '.join(missing)}; {fix}")
    return record


def _read_json(path: Path, fix: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record in a JSON file (``model.json``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is damaged: not UTF-8 text ({err.reason} at byte {err.start}); {fix}") from None
    return _parse_record(text, path, fix, required)


def _read_safetensors(path: Path, fix: str, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (``tensors=False``: metadata only); a file
    safetensors cannot read (cut short, not safetensors) is a ``ValueError`` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), metadata
    except SafetensorError as err:
        raise ValueError(f"{path} is damaged: safetensors cannot read it ({first_line(err)}); {fix}") from None


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | os.PathLike, fix: str = "") -> None:
    """Load ``tensors`` (read from ``source``) into ``model``; every key must fit.

    Raises:
        ValueError: naming ``source``: keys missing, unexpected, or of another shape (the file
            was saved from another model).
    """
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ValueError(f"{source} does not fit the model: {detail[:300]}"
                         f"{'; ' + fix if fix else ''}") from None


# --- the model: weights + how to rebuild it --------------------------------------------------


def save_model(out: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` then ``model.json`` (the JSON is also the file's metadata)."""
    out = Path(out)
    record = {"format": FORMAT, **_jsonable(meta)}
    _save_tensors(out / MODEL_WEIGHTS, model.state_dict(), {"autocut": json.dumps(record)})
    _save_json(out / MODEL_META, record)


def _paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, json)`` for a run folder, its JSON or its safetensors file."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / MODEL_WEIGHTS, path / MODEL_META
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path, path.with_suffix(".json")


def _fixes(weights: Path, meta: Path) -> tuple[str, str]:
    """What to do about a damaged ``model.json`` and a damaged ``model.safetensors``."""
    run = weights.parent
    resume = (f"`autocut finetune --resume --out {run}` rewrites both from its {STATE}"
              if (run / STATE).is_file() else f"train the run again (there is no {STATE} to rebuild it from)")
    return f"delete it to use the copy of it inside {weights.name}, or {resume}", resume


def _embedded(weights: Path, fix: str) -> dict[str, Any] | None:
    """The JSON record a ``model.safetensors`` carries in its metadata, ``None`` without one."""
    _, metadata = _read_safetensors(weights, fix, tensors=False)
    text = metadata.get("autocut")
    return None if text is None else _parse_record(text, weights, fix, _MODEL_KEYS)


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a checkpoint (from ``model.json``, else the weights file's metadata).

    Raises:
        FileNotFoundError: neither file is there.
        ValueError: the file read is damaged, incomplete or not autocut's (named, with what to do).
    """
    weights, meta = _paths(checkpoint)
    fix_meta, fix_weights = _fixes(weights, meta)
    if meta.is_file():
        return _read_json(meta, fix_meta, _MODEL_KEYS)
    if weights.is_file():
        record = _embedded(weights, fix_weights)
        if record is None:
            raise ValueError(f"{weights} has no autocut metadata and there is no {meta.name} beside it: "
                             "pass the folder of an autocut finetune run")
        return record
    raise FileNotFoundError(f"no checkpoint at {checkpoint}: expected a run folder or its {MODEL_META}/{MODEL_WEIGHTS}")


def cut_from_dict(record: dict[str, Any]):
    """The :class:`~autocut.Cut` a checkpoint's JSON describes."""
    from autocut.cut import Cut

    def tuples(value):  # JSON has lists where the Cut has tuples
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return Cut(**{k: tuples(v) for k, v in record.items()})


def build_model(meta: dict[str, Any]) -> nn.Module:
    """The model a checkpoint's JSON describes, with random weights (no pretrained download): a
    U-Net for a segmentation (``"task": "segment"``), else an adapted classifier."""
    import dataclasses

    from autocut import adapt, unet, zoo

    # the backbone is cut at its own channel count; adapt(n_in=) then rebuilds the input layer
    own = (zoo.default_input_size(zoo.resolve(meta["arch"]))[0], *meta["input_size"][1:])
    if meta.get("task") == "segment":
        return unet(meta["arch"], n_out=len(meta["classes"]), input_size=own, n_in=meta["n_in"], init=None,
                    **meta["head_options"])
    cut = dataclasses.replace(cut_from_dict(meta["cut"]), input_size=own)
    return adapt(meta["arch"], n_out=len(meta["classes"]), cut=cut, input_size=own, n_in=meta["n_in"], init=None,
                 **meta["head_options"])


def _says(record: dict[str, Any]) -> str:
    return f"{record['arch']} with {len(record['classes'])} classes"


def load_model(checkpoint: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned model from its checkpoint, in eval mode on the CPU; with its JSON.

    Nothing is unpickled: the model is built from the JSON's arch, cut and head options with
    random weights, then the safetensors tensors are loaded into it (every key must fit).

    Example:
        >>> model, meta = load_model("runs/resnet18")
        >>> meta["classes"][:3]
        ['0', '1', '2']
    """
    meta = read_meta(checkpoint)
    weights, json_path = _paths(checkpoint)
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}")
    fix_meta, fix_weights = _fixes(weights, json_path)
    tensors, metadata = _read_safetensors(weights, fix_weights)
    own = metadata.get("autocut")
    if own is not None and json_path.is_file():  # the JSON beside the weights must be theirs
        own = _parse_record(own, weights, fix_weights, _MODEL_KEYS)
        if differ := [k for k in _IDENTITY if _jsonable(own.get(k)) != _jsonable(meta.get(k))]:
            raise ValueError(f"{json_path} does not describe {weights}: it says {_says(meta)}, the weights were saved "
                             f"as {_says(own)} ({', '.join(differ)} differ: the two files come from different runs); "
                             f"{fix_meta}")
    model = build_model(meta)
    load_weights(model, tensors, weights, f"is {json_path.name} the one saved with it? {fix_meta}")
    return model.eval(), meta


# --- the run's folder ---------------------------------------------------------------------------


def _stale_temps(out: Path) -> list[Path]:
    """Temporary files of :func:`_atomic` (``.NAME.PID.tmp``) whose process is gone (killed while
    saving)."""
    stale = []
    for name in (MODEL_WEIGHTS, MODEL_META, STATE):
        for tmp in out.glob(f".{name}.*.tmp"):
            pid = tmp.name[len(name) + 2:-len(".tmp")]
            if not pid.isdigit():
                continue
            if int(pid) != os.getpid():
                try:
                    os.kill(int(pid), 0)
                    continue  # its process still runs (another run saving into this folder)
                except ProcessLookupError:
                    pass
                except (PermissionError, OverflowError):
                    continue
            stale.append(tmp)
    return sorted(stale)


def prepare_out(out: str | os.PathLike, resume: bool, clean: bool = True) -> list[Path]:
    """Check, before any work, that the folder ``out`` can take a run; with ``clean``, remove the
    temporary files a killed save left in it. Returns the files removed.

    A run is never overwritten: a folder that holds one (``model.json``, ``model.safetensors``
    or ``state.safetensors``) is refused unless ``resume``.

    Raises:
        ValueError: ``out`` is a file, or holds a run and ``resume`` is false (the message says
            to pass ``--resume`` or another ``--out``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: pass the folder to write the run into "
                         "(new, empty, or a run's folder with --resume)")
    removed = []
    if clean and out.is_dir():
        for tmp in _stale_temps(out):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    found = [name for name in (MODEL_META, MODEL_WEIGHTS, STATE) if (out / name).is_file()]
    if found and not resume:
        try:
            record = read_meta(out)
            done, total = record.get("epoch"), record.get("epochs")
            finished = done == total and not record.get("interrupted")
            what = (f"a finished run of {record['arch']} ({done} epoch{'s' * (done != 1)})" if finished
                    else f"an unfinished run of {record['arch']} ({done} of {total} epochs done)")
        except (ValueError, FileNotFoundError, KeyError):
            finished, what = False, f"an earlier run ({', '.join(found)})"
        todo = ("pass another --out (out=) for a new run, or delete the folder first" if finished else
                "pass --resume (resume=True) to continue it, or another --out (out=) for a new run")
        raise ValueError(f"--out {out} holds {what}, which is never overwritten: {todo}")
    return removed


# --- what --resume needs -----------------------------------------------------------------------


def save_state(out: str | os.PathLike, model: nn.Module, optimizer, scheduler, meta: dict[str, Any]) -> None:
    """One file: the weights, the optimiser's tensors, and JSON for the rest."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    extra = {}
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                extra.setdefault(str(index), {})[name] = value
    record = {
        "format": FORMAT,
        **_jsonable(meta),
        "optimizer": {"param_groups": _jsonable(opt["param_groups"]), "state": _jsonable(extra)},
        "scheduler": _jsonable(scheduler.state_dict()),
    }
    _save_tensors(Path(out) / STATE, tensors, {"autocut": json.dumps(record)})


def load_state(out: str | os.PathLike) -> dict[str, Any] | None:
    """``{"meta", "model", "optimizer", "scheduler"}`` from a run folder, ``None`` if it has none.
    The optimiser's state dict is rebuilt from tensors and JSON (``betas`` back to tuples)."""
    path = Path(out) / STATE
    if not path.is_file():
        return None
    fix = (f"this run cannot be resumed: start afresh with another --out (the model of its last saved epoch is in "
           f"{Path(out) / MODEL_WEIGHTS})")
    tensors, metadata = _read_safetensors(path, fix)
    if "autocut" not in metadata:
        raise ValueError(f"{path} has no autocut metadata: it is not the state of an autocut finetune run; {fix}")
    record = _parse_record(metadata["autocut"], path, fix, ("options", "history", "phase", "optimizer", "scheduler"))
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, slots in record["optimizer"]["state"].items():
        state.setdefault(int(index), {}).update(slots)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in record["optimizer"]["param_groups"]]
    optimizer = {"state": state, "param_groups": groups}
    scheduler = record.pop("scheduler")
    record.pop("optimizer")
    return {"meta": record, "model": model, "optimizer": optimizer, "scheduler": scheduler}
