"""Native hot paths, compiled by `pip install -e .` (the rest of the build is in pyproject.toml).

Each extension has a pure-Python twin that stays the reference: it is used when the
extension is missing or `LEDGERFLOW_NATIVE=0`, and differential tests hold the two equal.
"""

from setuptools import Extension, setup

_CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

ext_modules: list[Extension] = []
# issue 10: the sink's Avro records → RowBinary rows, checked as the Codec would (projections/avro_block.py)
ext_modules.append(
    Extension("projections._rowbinary", ["projections/_rowbinary.c"], extra_compile_args=_CFLAGS, optional=True)
)
# issue 10: replay reads Kafka as runs of records (projections/kafka_reader.py); librdkafka is dlopen'd, not linked
ext_modules.append(
    Extension(
        "projections._kafka_reader",
        ["projections/_kafka_reader.c"],
        libraries=["dl"],
        extra_compile_args=_CFLAGS,
        optional=True,
    )
)
# issue 6: `audit verify` from the log (audit.verify_log_native), the ledger worker's fold (LedgerWorker._chain_native)
ext_modules.append(
    Extension(
        "domain._ledger_native",
        ["domain/_ledger_native.c"],
        libraries=["crypto"],
        extra_compile_args=_CFLAGS,
        optional=True,
    )
)

setup(ext_modules=ext_modules)
