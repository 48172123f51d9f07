"""``python -m lexica``: the same as the ``lexica`` command."""

import sys

from lexica.cli import main

sys.exit(main())
