import sys

from normfuse.cli import main

sys.exit(main())
