"""`python -m agents worker ...`: the Faust worker, configured from ledgerflow settings."""

from agents.app import create_app, ensure_internal_topics
from ledgerflow.settings import load
from streams import telemetry
from streams.topics import Topics

settings = load()
app = create_app(
    settings.worker_id,
    settings.bootstrap,
    Topics(settings.topic_prefix, settings.partitions),
    data_dir=str(settings.resolved_data_dir / "agents"),
    web_port=settings.worker_web_port,
)
# issue 11: Faust sets logging up when the worker starts (level from --loglevel); lines are ours
app.conf.logging_config = telemetry.faust_logging_config("agents", settings.log_format)

if __name__ == "__main__":
    telemetry.start("agents", settings)
    ensure_internal_topics(app, settings.bootstrap)
    app.main()
