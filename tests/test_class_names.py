"""Class names a reader can tell apart: no two of xpcnn's classes share one (a cuDNN graph's
plan was a ``Plan`` as the model's forward/backward plan is; an ONNX export's step a ``Node`` as
a functional graph's call is)."""

import ast
import collections
from pathlib import Path

import xpcnn

#: Names shared on purpose: none (xpcnn.History is the callback; the record it subclasses is
#: history.EpochRecord).
SHARED: dict[str, list[str]] = {}


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


def test_no_module_is_imported_under_a_packages_name():
    """``from . import im2col as ops`` made ``ops.conv_forward`` read as the xpcnn.ops
    package's: a module imported under another name must not take a package's name."""
    root = Path(xpcnn.__file__).parent
    packages = {p.parent.name for p in root.rglob("__init__.py")} | {"xpcnn"}
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found += [f"{path.relative_to(root.parent).as_posix()}: {a.name} as {a.asname}"
                          for a in node.names if a.asname in packages
                          and a.name.rpartition(".")[2] != a.asname]
    assert found == []
