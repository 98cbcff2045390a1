"""`python -m jobs.entrypoint JOB_DIR`: the process that drives one job (Ray Jobs entrypoint, `runner run`)."""

import sys

from jobs.driver import main

if __name__ == "__main__":
    sys.exit(main())
