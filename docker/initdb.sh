#!/bin/sh
# Runs once, when the postgres container of compose.yml initializes its data
# volume (mounted into /docker-entrypoint-initdb.d): walnats gets a role of
# its own, never a superuser, and the superuser makes the publication.
set -e
psql -v ON_ERROR_STOP=1 -v pw="$WALNATS_PASSWORD" \
  --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
-- REPLICATION: the replication connection, the slot, logical messages.
CREATE ROLE walnats LOGIN REPLICATION PASSWORD :'pw';
-- SELECT: the snapshots read the published tables, also those that the
-- superuser creates later (as in compose.yml's psql example).
GRANT SELECT ON ALL TABLES IN SCHEMA public TO walnats;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO walnats;
-- FOR ALL TABLES needs a superuser: made here, walnats finds it.
CREATE PUBLICATION walnats FOR ALL TABLES;
SQL
