"""Console commands (`pip install -e .`): simpo-train, simpo-eval, simpo-onpolicy run the flat
scripts of the repository exactly as `python train.py ...` would; simpo-report is
`python -m simpo.report`.

The scripts stay at the repository root, readable and runnable with torchrun; these commands
find them next to the package (an editable install points into the clone) and run them as
`__main__`, so arguments, error messages and exit codes are the scripts' own. Under torchrun:
`torchrun --nproc_per_node 8 --no-python simpo-train --config ...`.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the clone: train.py, eval.py, configs/


def run_script(name: str, argv: list[str] | None = None) -> None:
    """Run `<clone>/<name>.py` as `python <name>.py argv...` (SystemExit carries its code)."""
    path = ROOT / f"{name}.py"
    if not path.is_file():
        command = f"simpo-{name}"
        hint = (
            f"{name}.py is not in this checkout ({ROOT})"
            if (ROOT / ".git").exists() or (ROOT / "pyproject.toml").is_file()
            else f"the package is installed without its scripts ({ROOT}); install a clone "
            "with `pip install -e <clone>`"
        )
        print(f"error: {command}: {hint}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [str(path), *(sys.argv[1:] if argv is None else argv)]
    sys.path.insert(0, str(ROOT))  # as `python train.py` puts the script's directory first
    runpy.run_path(str(path), run_name="__main__")


def train() -> None:
    run_script("train")


def evaluate() -> None:
    run_script("eval")


def onpolicy() -> None:
    run_script("onpolicy")
