"""gunicorn settings for ptth_relay from a checkout: `gunicorn -c conf/gunicorn.conf.py ptth_relay:app`.

The settings themselves, one comment each, are in ptth_lib/relay/gunicorn_settings.py,
which `ptth-relay` applies too. The relay config file comes from $PTTH_RELAY_CONFIG
(default ./ptth_relay.toml).
"""

import sys
from pathlib import Path

# This file's checkout first on the path, so that gunicorn finds its ptth_lib and
# ptth_relay whatever the current folder.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "ptth_lib").is_dir() and str(_CHECKOUT) not in sys.path:
    sys.path.insert(0, str(_CHECKOUT))

from ptth_lib.relay.gunicorn_settings import *
