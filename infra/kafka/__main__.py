"""``python -m infra.kafka start|stop|status``: same CLI as ``python -m infra.kafka.runner``."""

import sys

from infra.kafka.runner import main

sys.exit(main())
