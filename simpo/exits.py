"""How train.py and eval.py end: one line per error, from the rank that has something to say.

Exit codes: 0 done; 2 bad input found before any work (config key or value, command-line
argument, output folder in use, a resume the checkpoint does not allow); 1 anything else that
stopped the run (data, tokenizer or model files, non-finite loss, out of memory, disk full,
unreadable checkpoints, a bug); 143 stopped by SIGTERM after saving a checkpoint; 130 Ctrl-C.

Under torchrun every rank meets the same input errors, so only rank 0 prints them; an error
only one rank can see (out of memory) is printed by that rank. A rank that fails because a
peer died (gloo/NCCL connection errors) exits quietly, so the cause stays the last line the
ranks print; torchrun then adds its own failure summary, whose "Root Cause" section repeats
the line (we write it to torchrun's error file).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

# substrings of the errors a collective raises when a peer process has gone away
PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "gloo/transport",
    "NCCL communicator was aborted",
)


def _rank() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def peer_failed(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank died (not this rank's fault)."""
    if isinstance(e, torch.distributed.DistError | ConnectionError):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in PEER_GONE)


def message_of(e: BaseException) -> str:
    """Our errors' own text (written to be read; a few carry a summary after the first line)."""
    return str(e).strip() or type(e).__name__


def _close_progress_bars() -> None:
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _tell_torchrun(message: str) -> None:
    """torchrun's failure summary shows this instead of 'To enable traceback see ...'."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            pass


def run(
    main: Callable[[], Any],
    usage_errors: tuple[type[BaseException], ...],
    handled: tuple[type[BaseException], ...],
) -> int:
    """Call `main` and return the process's exit code, printing at most one line on failure.

    `usage_errors` exit 2, `handled` exit 1 (both as `error: <message>`); anything else prints
    its traceback (a bug) unless a peer rank's death caused it. A result with
    `interrupted` set (SIGTERM, checkpoint saved) exits 143.
    """
    try:
        result = main()
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        ours = isinstance(e, (*usage_errors, *handled))
        if not ours and peer_failed(e):  # the peer that died says why
            return 1
        if not ours and not isinstance(e, OSError):  # a bug: show where
            traceback.print_exc()
            _tell_torchrun(f"{type(e).__name__}: {message_of(e)} (traceback above)")
            return 1
        rank = _rank()
        _close_progress_bars()  # else a bar redrawn at exit would follow the error line
        if rank == 0 or getattr(e, "rank_local", False):
            where = f"rank {rank}: " if rank and getattr(e, "rank_local", False) else ""
            message = f"error: {where}{message_of(e)}"
            print(message, file=sys.stderr, flush=True)
            _tell_torchrun(message)
        return 2 if isinstance(e, usage_errors) else 1
    if isinstance(result, dict) and result.get("interrupted"):
        return 143
    return 0
