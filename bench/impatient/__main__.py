import sys

from bench.impatient.cli import main

sys.exit(main())
