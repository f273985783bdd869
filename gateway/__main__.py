"""`python -m gateway`: run one gateway replica with settings from the environment."""

import logging

from gateway.server import run
from ledgerflow.settings import load

settings = load()
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
run(settings)
