"""Where swarmrl keeps its files: `$SWARMRL_HOME` (default `~/.swarmrl`)."""

import os
from pathlib import Path


def swarmrl_home() -> Path:
    return Path(os.environ.get("SWARMRL_HOME", "~/.swarmrl")).expanduser()
