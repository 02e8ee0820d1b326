import sys

from deltafs.cli import main

sys.exit(main())
