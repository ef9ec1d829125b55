"""``python -m fmtl_lightning.deploy ...`` (same as ``fmtl deploy ...``)."""

import sys

from fmtl_lightning.deploy.cli import main

sys.exit(main())
