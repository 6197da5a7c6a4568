"""`python -m deploy up|down|status|validate|ctl`: the same as the `sutra` command."""

import sys

from deploy.cli import main

sys.exit(main())
