import sys

from gmbench.cli import main

sys.exit(main())
