"""`python -m simpo --version`: simpo's version and the torch / CUDA it runs on."""

from __future__ import annotations

import sys

import simpo

COMMANDS = """commands (after `pip install -e .`; or the scripts in the clone):
  simpo-train     python train.py --config FILE [--section.key=value ...]
  simpo-eval      python eval.py --model DIR --data FILE
  simpo-onpolicy  python onpolicy.py ...
  simpo-report    python -m simpo.report RUN_DIR [RUN_DIR ...] --out DIR
  python -m simpo.demo --out demo_out"""


def versions() -> str:
    """simpo X (torch Y, CUDA Z / no CUDA, the GPUs it sees)."""
    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        device = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {', '.join(names)}"
    elif torch.version.cuda:
        device = f"CUDA {torch.version.cuda} build, no GPU visible"
    else:
        device = "CPU build, no CUDA"
    return f"simpo {simpo.__version__} (torch {torch.__version__}, {device})"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-V"]):
        print(versions())
    elif args in ([], ["-h"], ["--help"]):
        print(f"usage: python -m simpo --version\n\n{COMMANDS}")
    else:
        print(f"python -m simpo: unknown arguments {args}; try --version\n\n{COMMANDS}")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
