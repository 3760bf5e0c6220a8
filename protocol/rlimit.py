"""The open-files limit of a command's process, raised to what the system allows.

Each connection a server accepts holds a file descriptor, and the usual soft limit (1,024)
is far below the usual hard limit. A server's connection cap is a share of the soft limit
(`shardcast.listener.default_total`), so each command raises the soft limit first.
"""

from __future__ import annotations

import resource


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the soft limit
    now in force (unchanged where the system refuses)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # some systems cap below the reported hard limit
            pass
    return soft
