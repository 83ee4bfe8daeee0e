"""`python -m ptth_lib.healthcheck`, the name cron lines use, for ptth_lib/tools/healthcheck.py."""

from ptth_lib.tools.healthcheck import main

if __name__ == "__main__":
    raise SystemExit(main())
