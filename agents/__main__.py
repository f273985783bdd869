"""`python -m agents worker ...`: the Faust worker, configured from ledgerflow settings."""

from agents.app import create_app, ensure_internal_topics
from ledgerflow.settings import load
from streams.topics import Topics

settings = load()
app = create_app(
    settings.worker_id,
    settings.bootstrap,
    Topics(settings.topic_prefix, settings.partitions),
    data_dir=str(settings.resolved_data_dir / "agents"),
    web_port=settings.worker_web_port,
)

if __name__ == "__main__":
    ensure_internal_topics(app, settings.bootstrap)
    app.main()
