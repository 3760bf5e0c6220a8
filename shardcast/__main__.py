import sys

from shardcast.cli import main

sys.exit(main())
