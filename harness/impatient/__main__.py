import sys

from harness.impatient.cli import main

sys.exit(main())
