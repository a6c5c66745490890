import sys

from optparity.cli import main

sys.exit(main())
