import sys

from pyinterp.cli import main

sys.exit(main())
