# Fixtures live in sc_helpers so test modules can import its helpers by name too.
from sc_helpers import identity, key_file, procs  # noqa: F401
