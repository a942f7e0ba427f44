"""One run per workdir: two runs writing the same checkpoints and state file would corrupt each other.

  with RunLock(workdir):        # raises LockedError naming the holder when another live run has it
      ...train...

The lock is `<workdir>/run.lock`, JSON {pid, host, started}, created whole in one step (written to a
temporary file, then hard-linked into place, which fails if the lock exists). A lock whose pid is not
alive on this host (a run killed with SIGKILL, a crashed machine) is stale: it is taken over with a note.
A lock held from another host cannot be checked from here and is never taken over.
"""
import datetime
import json
import os
import socket
import sys
import tempfile

LOCK_FILE = "run.lock"


class LockedError(RuntimeError):
    """The workdir is in use by another run."""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _describe(holder):
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


class RunLock:
    """The lock file of `directory`; `acquire()` / `release()` or a `with` block."""

    def __init__(self, directory, note=None):
        self.path = os.path.join(directory, LOCK_FILE)
        self.note = note or (lambda message: print(message, file=sys.stderr))
        self.held = False
        self.record = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "command": " ".join(os.path.basename(a) if i == 0 else a
                                           for i, a in enumerate(sys.argv))[:200]}

    def _read(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _create(self):
        directory = os.path.dirname(self.path)
        descriptor, temporary = tempfile.mkstemp(prefix=".run.lock-", dir=directory)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(self.record, handle)
            os.link(temporary, self.path)  # atomic, and fails if a lock exists
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(temporary)

    def acquire(self):
        for _ in range(3):  # a stale lock removed by us or by a racing run: try again
            if self._create():
                self.held = True
                return self
            holder = self._read()
            if holder is None:
                continue
            pid, host = holder.get("pid"), holder.get("host")
            if holder and host == self.record["host"] and isinstance(pid, int) and _alive(pid):
                raise LockedError(f"--workdir: {os.path.dirname(self.path)!r} is in use by another run "
                                  f"({_describe(holder)}); wait for it to end, or choose another --workdir "
                                  "or --name")
            if holder and host != self.record["host"]:
                raise LockedError(f"--workdir: {os.path.dirname(self.path)!r} is in use by a run on another "
                                  f"host ({_describe(holder)}); if that run has ended, delete {self.path}")
            if self._read() == holder:  # still the same stale lock (not one a racing run just took)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    continue
                self.note(f"Note: took over the lock {self.path} left by a run that is no longer running "
                          f"({_describe(holder) if holder else 'unreadable lock file'})")
        raise LockedError(f"--workdir: could not take the lock {self.path}; another run keeps taking it")

    def release(self):
        if self.held and (self._read() or {}).get("pid") == self.record["pid"]:
            os.remove(self.path)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
