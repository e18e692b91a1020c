"""Nothing read from data is ever unpickled or evaluated: the catalog is data, not code.

A static scan of every module under src/ for the calls that turn bytes into code
(pickle and its relatives, eval/exec/compile, yaml.load, numpy's allow_pickle,
pandas.read_pickle, torch.load without ``weights_only=True``).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "voxlake"

#: Call names that execute or unpickle whatever they are given.
_FORBIDDEN_CALLS = {
    "eval", "exec", "compile", "__import__",
    "pickle.load", "pickle.loads", "pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads",
    "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads",
    "shelve.open", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
    "pd.read_pickle", "pandas.read_pickle", "jsonpickle.decode",
}  # fmt: skip
_FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _findings(path: Path, root: Path = SRC) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(root.parent)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            for module in modules:
                if module and module.split(".")[0] in _FORBIDDEN_MODULES:
                    out.append(f"{where}:{node.lineno} imports {module}")
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in _FORBIDDEN_CALLS or name.endswith(".read_pickle"):
            out.append(f"{where}:{node.lineno} calls {name}")
        if name.endswith("torch.load"):
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                out.append(f"{where}:{node.lineno} torch.load without weights_only=True")
        flag = keywords.get("allow_pickle")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
            out.append(f"{where}:{node.lineno} {name}(allow_pickle=...)")
    return out


def test_no_module_unpickles_or_evaluates_anything():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    findings = [f for path in files for f in _findings(path)]
    assert findings == []


def test_torch_checkpoints_are_loaded_weights_only():
    uses = [
        (path.relative_to(SRC.parent), line)
        for path in SRC.rglob("*.py")
        for line in path.read_text().splitlines()
        if "torch.load(" in line
    ]
    assert uses, "the training loop resumes from checkpoints with torch.load"
    assert all("weights_only=True" in line for _, line in uses), uses


def test_the_scan_catches_what_it_forbids(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import pickle\nimport numpy as np\nimport torch\n"
        "x = pickle.loads(b'')\ny = eval('1')\nz = np.load('f', allow_pickle=True)\n"
        "w = torch.load('c')\n"
    )
    found = _findings(sample, root=tmp_path)
    assert len(found) == 5, found
