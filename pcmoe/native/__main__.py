import sys

from pcmoe.native import main

sys.exit(main())
