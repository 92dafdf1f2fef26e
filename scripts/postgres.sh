#!/usr/bin/env bash
# Install (Debian's postgresql), start a local PostgreSQL on loopback and create the test database.
# Prints the SQLAlchemy URL to use. Idempotent.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | grep -q "^$ver main"; then
  pg_createcluster "$ver" main >/dev/null
fi
pg_ctlcluster "$ver" main start 2>/dev/null || true
for _ in $(seq 1 30); do
  pg_isready -h 127.0.0.1 -q && break
  sleep 1
done
su postgres -c "psql -q -tc \"SELECT 1 FROM pg_roles WHERE rolname='dooly'\" | grep -q 1 || psql -q -c \"CREATE ROLE dooly LOGIN SUPERUSER PASSWORD 'dooly'\""
su postgres -c "psql -q -tc \"SELECT 1 FROM pg_database WHERE datname='dooly_test'\" | grep -q 1 || createdb -O dooly dooly_test"
echo "postgresql+psycopg://dooly:dooly@127.0.0.1:5432/dooly_test"
