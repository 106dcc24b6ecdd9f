"""Checkpoints that never need unpickling: tensors in safetensors, everything else in JSON.

A run's folder holds

- ``model.safetensors`` + ``model.json``: the weights, and what it takes to rebuild the model
  around them (arch, cut, head options, classes, input size, normalisation). :func:`load_model`
  builds the model with random weights from the JSON, then loads the tensors.
- ``state.safetensors``: what ``--resume`` needs, in one file: the weights at the last finished
  epoch, the optimiser's tensors, and (as JSON in the file's metadata) the optimiser's param
  groups, the scheduler's state, the run's options and its history.

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash
or Ctrl-C never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_WEIGHTS",
    "MODEL_META",
    "STATE",
    "save_model",
    "load_model",
    "read_meta",
    "save_state",
    "load_state",
    "cut_from_dict",
]

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
STATE = "state.safetensors"
FORMAT = "autocut.finetune/1"


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


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a checkpoint (from ``model.json``, else the weights file's metadata)."""
    weights, meta = _paths(checkpoint)
    if meta.is_file():
        record = json.loads(meta.read_text())
    elif weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            text = (f.metadata() or {}).get("autocut")
        if text is None:
            raise ValueError(f"{weights} has no autocut metadata and there is no {meta.name} beside it")
        record = json.loads(text)
    else:
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: expected a run folder or its {MODEL_META}/{MODEL_WEIGHTS}")
    if record.get("format") != FORMAT:
        raise ValueError(f"{meta} is not an autocut finetune checkpoint (format {record.get('format')!r}, expected {FORMAT!r})")
    return record


def cut_from_dict(record: dict[str, Any]):
    """The :class:`~autocut.Cut` a checkpoint's JSON describes."""
    from autocut.cut import Cut

    def tuples(value):  # JSON has lists where the Cut has tuples
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return Cut(**{k: tuples(v) for k, v in record.items()})


def build_model(meta: dict[str, Any]) -> nn.Module:
    """The model a checkpoint's JSON describes, with random weights (no pretrained download)."""
    import dataclasses

    from autocut import adapt, zoo

    # the backbone is cut at its own channel count; adapt(n_in=) then rebuilds the input layer
    own = (zoo.default_input_size(zoo.resolve(meta["arch"]))[0], *meta["input_size"][1:])
    cut = dataclasses.replace(cut_from_dict(meta["cut"]), input_size=own)
    return adapt(meta["arch"], n_out=len(meta["classes"]), cut=cut, input_size=own, n_in=meta["n_in"], init=None,
                 **meta["head_options"])


def load_model(checkpoint: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned model from its checkpoint, in eval mode on the CPU; with its JSON.

    Nothing is unpickled: the model is built from the JSON's arch, cut and head options with
    random weights, then the safetensors tensors are loaded into it (every key must fit).

    Example:
        >>> model, meta = load_model("runs/resnet18")
        >>> meta["classes"][:3]
        ['0', '1', '2']
    """
    from safetensors.torch import load_file

    meta = read_meta(checkpoint)
    weights, _ = _paths(checkpoint)
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}")
    model = build_model(meta)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), meta


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
    from safetensors import safe_open

    path = Path(out) / STATE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        record = json.loads(f.metadata()["autocut"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} is not an autocut finetune state (format {record.get('format')!r})")
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
