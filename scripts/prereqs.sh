#!/usr/bin/env bash
# Checks what a fresh machine needs before `make`, and says how to get what is missing.
set -euo pipefail
fail=0
need() { echo "ledgerflow: missing prerequisite: $1" >&2; echo "  fix: $2" >&2; fail=1; }

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  need "Python 3.11+ ($PY not found)" "install python3 (3.11 or newer), or set PYTHON=/path/to/python3.11"
elif ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  need "Python 3.11+ ($("$PY" --version 2>&1) found)" "install Python 3.11 or newer, or set PYTHON=/path/to/python3.11"
elif ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need "Python venv module" "apt-get install python3-venv"
fi
if ! command -v java >/dev/null 2>&1; then
  need "Java 17+ (runs the Kafka broker)" "apt-get install openjdk-17-jre-headless"
else
  major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  if [ -z "$major" ] || [ "$major" -lt 17 ]; then
    need "Java 17+ (found: $(java -version 2>&1 | head -1))" "apt-get install openjdk-17-jre-headless, or put a JDK 17+ first on PATH"
  fi
fi
command -v mvn >/dev/null 2>&1 || need "Maven (fetches the Kafka jars from Maven Central)" "apt-get install maven"
command -v redis-server >/dev/null 2>&1 || need "redis-server (rate limits shared by gateway replicas)" "apt-get install redis-server"
# Not fatal: without them the C hot paths are skipped (setup.py marks them optional) and their
# pure-Python twins run, slower.
if ! command -v gcc >/dev/null 2>&1 || [ ! -f /usr/include/openssl/sha.h ]; then
  echo "ledgerflow: note: gcc or OpenSSL headers missing: the C hot paths will not be built" >&2
  echo "  fix: apt-get install gcc libssl-dev" >&2
fi
exit $fail
