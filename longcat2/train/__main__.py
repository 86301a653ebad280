import sys

from longcat2.train import main

sys.exit(main())
