"""An `effc compile` output directory written as a whole.

Everything goes into a staging directory beside OUT (same filesystem, so renames are atomic);
`commit` swaps it in with two renames. A lock file beside OUT keeps a second writer out. On any
failure, Ctrl-C or SIGTERM before the swap, the staging directory is removed and the previous
OUT is untouched; a process killed between the two renames leaves OUT set aside under a name
the next compile puts back (`_recover`).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path

from effc.errors import EffcError

# What `effc compile` writes into OUT; anything else there is the user's and OUT is refused.
OUT_NAMES = frozenset({"model.onnx", "model.onnx.data", "report.json", "intermediate", "model.so", "params.bin",
                       "codegen.json", "build.log", "recipe.json"})


def _hidden(out: Path, tag: str) -> str:
    return f".{out.name}.effc-{tag}"


class StagedOut:
    """``with StagedOut(out, protect) as stage: write into stage.path ...; stage.commit()``.

    ``protect``: files (the input model and its external data) that OUT must not hold.
    Leaving the block without ``commit`` (an exception, a signal) discards the staging directory.
    """

    def __init__(self, out: str | os.PathLike, protect: list[Path] = ()):
        self.out = Path(os.path.abspath(out))
        self.parent = self.out.parent
        self.protect = [Path(os.path.realpath(p)) for p in protect]
        self.path: Path | None = None
        self._lock_fd: int | None = None
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> "StagedOut":
        self._check_out()
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            _recover(self.out)
            self._check_existing()
            # SIGTERM becomes an exception like Ctrl-C, so the staging directory is cleaned up. Both are
            # also remembered: TVM turns a KeyboardInterrupt raised inside its calls into a RuntimeError,
            # which code that tolerates TVM's failures would swallow; commit() refuses after one.
            _received.clear()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old_handlers[sig] = signal.signal(sig, _raise_interrupt)
                except ValueError:  # not the main thread: leave signals alone
                    pass
            self.path = Path(tempfile.mkdtemp(prefix=_hidden(self.out, "staging-"), dir=self.parent))
            os.chmod(self.path, 0o777 & ~_umask())
        except BaseException:  # an interrupt here too: __exit__ will not run
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.path is not None and self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self._unlock()

    def commit(self) -> Path:
        """Swap the staging directory in as OUT; the previous OUT is removed afterwards."""
        assert self.path is not None
        aside = None
        blocked = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # the two renames are not interrupted
        try:
            if _received:  # an interrupt some library swallowed: the output must not appear
                raise KeyboardInterrupt(f"signal {_received[0]}")
            if self.out.exists():
                aside = Path(tempfile.mkdtemp(prefix=_hidden(self.out, "old-"), dir=self.parent))
                os.replace(self.out, aside)  # replaces the empty placeholder mkdtemp made
            os.replace(self.path, self.out)
            self.path = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return self.out

    def _check_out(self) -> None:
        out = self.out
        for path in (out, *out.parents):
            if path.exists() and not path.is_dir():
                raise EffcError(f"-o {out}: {path} is a file, not a directory")
        real = Path(os.path.realpath(out))
        for p in self.protect:
            if p == real or real in p.parents:
                raise EffcError(f"-o {out}: holds the input file {p.name}; effc never overwrites its inputs "
                                "(choose another output directory)")

    def _check_existing(self) -> None:
        if not self.out.is_dir():
            return
        entries = sorted(e.name for e in self.out.iterdir())
        foreign = [e for e in entries if e not in OUT_NAMES]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... (+{len(foreign) - 5})" if len(foreign) > 5 else "")
            raise EffcError(f"-o {self.out}: holds files effc did not write ({shown}); effc replaces OUT as a "
                            "whole, so choose a new or empty directory")
        if entries and "report.json" not in entries:
            raise EffcError(f"-o {self.out}: is not an `effc compile` output (no report.json); choose a new or "
                            "empty directory")

    def _lock(self) -> None:
        import fcntl

        path = self.parent / _hidden(self.out, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise EffcError(f"-o {self.out}: another effc compile is writing it; try again when it has "
                                "finished") from None
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock; the lock file stays (harmless, hidden)
            self._lock_fd = None


def _recover(out: Path) -> None:
    """Under the lock: put back an OUT set aside by a writer killed mid-swap; drop stale staging."""
    aside = sorted(out.parent.glob(_hidden(out, "old-") + "*"), key=lambda p: p.stat().st_mtime)
    if aside and not out.exists():
        os.replace(aside.pop(), out)
    for stale in [*aside, *out.parent.glob(_hidden(out, "staging-") + "*")]:
        shutil.rmtree(stale, ignore_errors=True)


_received: list[int] = []  # signals that arrived inside a StagedOut block


def interrupted() -> bool:
    """Whether Ctrl-C or SIGTERM arrived inside the current StagedOut block (even if swallowed since)."""
    return bool(_received)


def _raise_interrupt(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
