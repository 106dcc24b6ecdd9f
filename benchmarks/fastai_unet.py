"""fastai's own ``DynamicUnet`` over its options, recorded as the oracle of :func:`autocut.unet`.

fastai is a benchmark-only dependency: this script builds fastai 2.8's ``DynamicUnet`` on small
hand-written encoders (``nn.Sequential`` bodies, the kind fastai's hooks need) for each case of
:data:`CASES`, and records

- each parameter and buffer in the order fastai registers them: shape and, for the initial
  values fastai gives them, a few statistics (mean, std, whether all equal);
- fastai's output for a fixed input in eval mode, or the error it raised (``bottle=True``: its
  last conv expects the channels its ``ResBlock`` halved);
- every tensor of the model (``tests/golden/fastai_unet.safetensors``: the encoders are tiny) and the input.

``tests/test_unet.py`` loads fastai's tensors into ``autocut.unet`` built on the same encoder (in
the order both register them, shapes checked) and compares the outputs, and compares autocut's
initial values with fastai's statistics: no fastai needed there. Nothing here imports autocut.

    # once, in a separate venv: torch and torchvision pinned to the project's
    python3 -m venv /tmp/fastai-venv
    /tmp/fastai-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 fastai==2.8.12
    /tmp/fastai-venv/bin/python benchmarks/fastai_unet.py     # writes tests/golden/fastai_unet.{json,safetensors}
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "fastai_unet.json"
TENSORS = GOLDEN.with_suffix(".safetensors")
SIDE, BATCH, N_OUT, SEED = 32, 2, 3, 0


def encoder(kind: str, n_in: int = 3) -> nn.Sequential:
    """A small body of ``kind``: ``"strided"`` (four stride-2 convs: strides 2 to 16) or
    ``"full"`` (a first block at the input's resolution, then three stride-2 convs)."""
    def block(ni, nf, stride):
        return [nn.Conv2d(ni, nf, 3, stride, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU()]

    if kind == "strided":
        layers = [*block(n_in, 4, 2), *block(4, 8, 2), *block(8, 12, 2), *block(12, 16, 2)]
    elif kind == "full":
        layers = [*block(n_in, 4, 1), *block(4, 8, 2), *block(8, 12, 2), *block(12, 16, 2)]
    else:
        raise ValueError(kind)
    return nn.Sequential(*layers)


# (name, encoder kind, DynamicUnet options); fastai's defaults where a case leaves one out
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("defaults", "strided", {}),
    ("full_resolution", "full", {}),
    ("self_attention", "strided", {"self_attention": True}),
    ("blur", "strided", {"blur": True}),
    ("blur_not_final", "strided", {"blur": True, "blur_final": False}),
    ("y_range", "strided", {"y_range": (0.0, 3.0)}),
    ("no_last_cross", "strided", {"last_cross": False}),
    ("bottle", "strided", {"bottle": True}),
    ("batch_norm", "strided", {"norm_type": "batch"}),
]


def _stats(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().double().flatten()
    return {"mean": t.mean().item(), "std": t.std().item() if t.numel() > 1 else 0.0,
            "constant": t.numel() > 0 and bool((t == t[0]).all()), "first": t[0].item() if t.numel() else None}


def record() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    import fastai
    from fastai.layers import NormType
    from fastai.vision.models.unet import DynamicUnet

    cases, tensors = [], {}
    for name, kind, options in CASES:
        torch.manual_seed(SEED)
        enc = encoder(kind)
        fastai_options = dict(options)
        if fastai_options.get("norm_type") == "batch":
            fastai_options["norm_type"] = NormType.Batch
        net = DynamicUnet(enc, N_OUT, (SIDE, SIDE), **fastai_options)
        state = net.state_dict()
        x = torch.randn(BATCH, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
        net.eval()
        try:
            with torch.no_grad():
                y = torch.Tensor(net(x)).as_subclass(torch.Tensor)
        except RuntimeError as err:  # bottle=True: fastai's last conv takes the channels its ResBlock halved
            y, error = None, str(err).splitlines()[0]
        else:
            error = None
        cases.append({
            "name": name, "encoder": kind, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "layers": [type(m).__name__ for m in net],
            "tensors": [{"key": k, "shape": list(v.shape), **_stats(v)} for k, v in state.items()],
            "output_shape": None if y is None else list(y.shape),
            "error": error,
        })
        for k, v in state.items():
            tensors[f"{name}/{k}"] = v.detach().clone().contiguous()
        tensors[f"{name}/:input"] = x
        if y is not None:
            tensors[f"{name}/:output"] = y.contiguous()
        net.sfs.remove()
    meta = {"fastai": fastai.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "side": SIDE, "batch": BATCH, "n_out": N_OUT, "seed": SEED}
    return {**meta, "cases": cases}, tensors


def main() -> None:
    from safetensors.torch import save_file

    data, tensors = record()
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    save_file(tensors, str(TENSORS))
    print(f"wrote {GOLDEN} and {TENSORS}: {len(data['cases'])} cases, fastai {data['fastai']}")


if __name__ == "__main__":
    main()
