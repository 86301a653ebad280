import sys

from longcat2.cli import main

sys.exit(main())
