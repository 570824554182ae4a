"""`python -m minivit.bench ...` is `minivit bench ...`; with --worker first, a benchmark worker process."""
import sys

from minivit.bench.report import main

sys.exit(main())
