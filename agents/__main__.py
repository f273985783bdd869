"""`python -m agents worker ...`: the Faust worker, configured from ledgerflow settings."""

from agents.app import create_app, ensure_internal_topics
from agents.ledger import LedgerConfig, load_or_create_key
from ledgerflow.settings import load
from streams.topics import Topics

settings = load()
app = create_app(
    settings.worker_id,
    settings.bootstrap,
    Topics(settings.topic_prefix, settings.partitions),
    data_dir=str(settings.resolved_data_dir / "agents"),
    web_port=settings.worker_web_port,
    ledger=LedgerConfig(
        key=load_or_create_key(settings.ledger_key_path, settings.ledger_origin),
        origin=settings.ledger_origin,
        every_n=settings.ledger_checkpoint_every,
        every_s=settings.ledger_checkpoint_interval_s,
        bootstrap=settings.bootstrap,
    ),
)

if __name__ == "__main__":
    ensure_internal_topics(app, settings.bootstrap)
    app.main()
