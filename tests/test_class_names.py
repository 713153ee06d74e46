"""Class names a reader can tell apart: no two of xpcnn's classes share one (a cuDNN graph's
plan was a ``Plan`` as the model's forward/backward plan is; an ONNX export's step a ``Node`` as
a functional graph's call is)."""

import ast
import collections
from pathlib import Path

import xpcnn

#: Names shared on purpose: callbacks.History is Keras' callback, the record of xpcnn.history
#: that it subclasses kept under the name Keras gives it.
SHARED = {"History": ["xpcnn/callbacks.py", "xpcnn/history.py"]}


def test_no_two_classes_share_a_name():
    root = Path(xpcnn.__file__).parent
    where = collections.defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(path.relative_to(root.parent).as_posix())
    shared = {name: sorted(paths) for name, paths in where.items() if len(paths) > 1}
    assert shared == SHARED
    assert "CudnnPlan" in where and "LayerStep" in where
