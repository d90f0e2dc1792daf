"""Source scan: nothing in cldist unpickles data it reads from files.

Every `torch.load` must pass `weights_only=True`; no module imports pickle/dill/joblib for
reading, and no webdataset pipeline uses its pickle-capable default decoders. Ray's and
torch.distributed's own in-process messaging (cloudpickle, broadcast_object_list) is not a
file read and is allowed in cldist/distributed/ only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "cldist"
FILES = sorted(SOURCE.rglob("*.py"))
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal"}
FORBIDDEN_CALLS = {"pickle.load", "pickle.loads", "numpy.load", "np.load", "torch.load"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_no_unpickling(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = {a.name.split(".")[0] for a in node.names} & FORBIDDEN_MODULES
            assert not bad, f"{path}:{node.lineno} imports {bad}"
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in FORBIDDEN_MODULES, f"{path}:{node.lineno}"
    for call, name in _calls(tree):
        if name in FORBIDDEN_CALLS:
            kwargs = {k.arg: k.value for k in call.keywords}
            safe = name == "torch.load" and isinstance(kwargs.get("weights_only"), ast.Constant) \
                and kwargs["weights_only"].value is True
            assert safe, f"{path}:{call.lineno}: {name} without weights_only=True"
        # webdataset's .decode() with no handlers, or any pickle-capable decoder by name
        assert "basichandlers" not in name and "autodecode" not in name, \
            f"{path}:{call.lineno}: webdataset default decoders can unpickle ({name})"


def test_scan_sees_the_package():
    assert len(FILES) > 30
