"""Imported first in worker processes (before MONAI): keep MONAI's import-time notices off the user's terminal.

The CLI sets the same filters in its own process (``subfore.cli.main``); a spawned or forkserver worker
starts without them.
"""

import logging
import warnings

warnings.filterwarnings("ignore")
for _name in ("monai", "pydicom"):
    logging.getLogger(_name).setLevel(logging.ERROR)
