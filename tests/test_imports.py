"""Smoke test: every module of the package and every top-level script imports cleanly."""

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "simpo").rglob("*.py")
    if p.name != "__main__.py"
)
SCRIPTS = sorted(
    p for p in [ROOT / "train.py", ROOT / "eval.py", ROOT / "onpolicy.py", *ROOT.glob("bench/*.py")]
)


def test_package_has_the_design_modules():
    expected = {"config", "model", "attention", "checkpoint", "tokenizer", "data", "packing"}
    expected |= {"logprobs", "losses", "world", "fsdp", "hf", "step", "generate", "demo"}
    assert expected <= {m.split(".")[1] for m in MODULES if "." in m}


def test_training_code_does_not_import_the_demo():
    """simpo.demo drives train.py/eval.py; nothing but train.py's fill-in step imports it."""
    for p in (ROOT / "simpo").glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import) (simpo\.demo\S*)", p.read_text(), re.M)
        assert not imports, f"{p.name} imports the demo package ({imports})"


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no module docstring"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_without_running(path):
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    sys.path.insert(0, str(path.parent))  # bench scripts import their sibling `common`
    try:
        spec.loader.exec_module(
            module
        )  # must not start a run: main is behind __name__ == "__main__"
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop(spec.name)
    assert module.__doc__, f"{path.name} has no module docstring"
