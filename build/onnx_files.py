"""ONNX graph files on disk: saving with external data, their size, and moving a finished graph into place."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

EXTERNAL_DATA_THRESHOLD = 1 << 20


def save_onnx(model, path: Path, threshold_bytes: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Save with all weights in one `<name>.data` beside `path` when they exceed `threshold_bytes`.

    onnx appends to an existing data file, so a stale one is removed first (a re-export into the
    same folder would otherwise grow it by one copy each time). Saving with external data empties
    the in-memory tensors: do not use `model` afterwards.
    """
    import onnx

    path = Path(path)
    data_name = path.name + ".data"
    stale = path.parent / data_name
    if stale.exists():
        stale.unlink()
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > threshold_bytes:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(model, str(path))


def artifact_size(onnx_path: Path) -> int:
    """Bytes on disk of the graph and its external data files."""
    import onnx

    onnx_path = Path(onnx_path)
    total = onnx_path.stat().st_size
    model = onnx.load(str(onnx_path), load_external_data=False)
    seen = set()
    for t in all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in seen:
                seen.add(loc)
                f = onnx_path.parent / loc
                if f.exists():
                    total += f.stat().st_size
    return total


def link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


def toposort(model) -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(model).topological_sort()


def move_graph(staged: Path, onnx_out: Path) -> None:
    """Move the staged graph (+ data) to its place, replacing an older one (and its stale data)."""
    data_name = onnx_out.name + ".data"
    old_data = onnx_out.parent / data_name
    if old_data.exists():
        old_data.unlink()
    staged_data = staged.parent / (staged.name + ".data")
    if staged_data.exists():
        shutil.move(str(staged_data), str(old_data))
    shutil.move(str(staged), str(onnx_out))


def all_tensors(model) -> Iterable:
    yield from model.graph.initializer
    for n in model.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
