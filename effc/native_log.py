"""Send native libraries' stderr (TVM's C++ LOG(WARNING) lines) to a file while Python's own
stderr (rich's console, warnings) keeps writing to the terminal."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def native_stderr_to(path: Path):
    """Within the block, file descriptor 2 writes to ``path``; ``sys.stderr`` to the old fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    python_stderr = sys.stderr
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(python_stderr, "encoding", None) or "utf-8",
                         errors="replace")
    try:
        os.dup2(log, 2)
        sys.stderr = terminal
        yield path
    finally:
        sys.stderr = python_stderr
        terminal.flush()  # not closed here: a console thread may still hold it; closed when dropped
        os.dup2(saved, 2)
        os.close(saved)
        os.close(log)
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:
                os.unlink(path)  # nothing said: no empty file in OUT
