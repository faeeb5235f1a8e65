#!/usr/bin/env bash
# Start the machine's PostgreSQL cluster (Debian/Ubuntu packaging: pg_ctlcluster) and
# make the test role and database the PostgreSQL tests use (tests/pg_server.py):
#   role labelgen (password labelgen, LOGIN CREATEDB), database labelgen_test owned by it.
# Idempotent: a running cluster is left alone, an existing role or database is kept (the
# role's password and rights are reset to the above). Prints the SQLAlchemy URL on stdout
# (everything else goes to stderr), so
#   export LABELGEN_TEST_POSTGRES="$(bash scripts/start-postgres.sh)"
# Run as root (or as the postgres user, or with passwordless sudo). Installs nothing:
# without PostgreSQL it says `apt-get install postgresql` and exits 1.
# PG_VERSION / PG_CLUSTER pick the cluster (default: 15/main, else the newest one).
set -euo pipefail
# Only the URL goes to the real stdout (fd 3): pg_ctlcluster and psql print notices such
# as "Removed stale pid file." on stdout, and a caller capturing the URL must not get them.
exec 3>&1 1>&2
# (The server is started with fd 3 closed: the daemon would hold it open otherwise.)

ROLE=labelgen
PASSWORD=labelgen
DATABASE=labelgen_test

say() { echo "start-postgres: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

if ! command -v pg_lsclusters >/dev/null || ! command -v pg_ctlcluster >/dev/null; then
  die "PostgreSQL is not installed (no pg_lsclusters/pg_ctlcluster): apt-get install postgresql"
fi

# Columns of pg_lsclusters -h: version cluster port status owner datadir logfile.
clusters="$(pg_lsclusters -h 2>/dev/null || true)"
[ -n "$clusters" ] || die "no PostgreSQL cluster exists: apt-get install postgresql (it creates one), or pg_createcluster 15 main"
version="${PG_VERSION:-}"
cluster="${PG_CLUSTER:-main}"
if [ -z "$version" ]; then
  if awk -v c="$cluster" '$1 == "15" && $2 == c {found = 1} END {exit !found}' <<<"$clusters"; then
    version=15
  else
    version="$(awk -v c="$cluster" '$2 == c {print $1}' <<<"$clusters" | sort -V | tail -n 1)"
  fi
fi
line="$(awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c' <<<"$clusters")"
[ -n "$line" ] || die "no PostgreSQL cluster ${version:-?}/$cluster; clusters here:
$clusters"
port="$(awk '{print $3}' <<<"$line")"
status="$(awk '{print $4}' <<<"$line")"

# Commands as the postgres superuser (peer authentication on the local socket).
if [ "$(id -u)" = 0 ]; then
  as_postgres() { (cd / && runuser -u postgres -- "$@"); }
elif [ "$(id -un)" = postgres ]; then
  as_postgres() { "$@"; }
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_postgres() { (cd / && sudo -n -u postgres -- "$@"); }
else
  die "run this as root (or as the postgres user): it starts the cluster and creates a role"
fi

if [ "$status" = online ]; then
  say "PostgreSQL $version/$cluster is already running on port $port"
else
  say "starting PostgreSQL $version/$cluster (port $port)"
  if [ "$(id -u)" = 0 ]; then
    pg_ctlcluster "$version" "$cluster" start 3>&-
  else
    as_postgres pg_ctlcluster "$version" "$cluster" start 3>&-
  fi
fi

for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$port" ||
  die "PostgreSQL $version/$cluster does not accept connections on 127.0.0.1:$port after 30 s (see /var/log/postgresql/postgresql-$version-$cluster.log)"

psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$port" -d postgres "$@"; }

psql_admin <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') THEN
    CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
  ELSE
    ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
  END IF;
END
\$\$;
SQL
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != 1 ]; then
  say "creating database $DATABASE"
  psql_admin -c "CREATE DATABASE $DATABASE OWNER $ROLE"
fi

# The tests connect over TCP with the password, so check exactly that.
PGPASSWORD="$PASSWORD" psql -X -q -h 127.0.0.1 -p "$port" -U "$ROLE" -d "$DATABASE" -tAc "SELECT 1" >/dev/null ||
  die "cannot log in as $ROLE on 127.0.0.1:$port (does pg_hba.conf allow password logins from 127.0.0.1?)"
say "ready: role $ROLE, database $DATABASE on 127.0.0.1:$port"
echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$port/$DATABASE" >&3
