"""`python -m gateway`: run one gateway replica with settings from the environment."""

from domain.redaction import ALL_KINDS, redact
from gateway.server import run
from ledgerflow.settings import load
from streams import telemetry

# Prompts are masked before anything logs them; log text is masked once more, in case a
# credential or PII reaches a message some other way. Addresses stay: operators need them.
LOG_KINDS = ALL_KINDS - {"ip_address"}


def scrub_log(text: str) -> str:
    return redact(text, LOG_KINDS).text


def main() -> None:
    settings = load()
    telemetry.start("gateway", settings, scrub=scrub_log)  # JSON logs and the tracer (issue 11)
    run(settings)


if __name__ == "__main__":
    main()
