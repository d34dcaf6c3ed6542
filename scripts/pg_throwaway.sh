#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on loopback in a temporary directory.
# Prints `export` lines for STACKKIT_TEST_POSTGRES_URL (database stackkit, password auth) and
# STACKKIT_PG_DIR; stop it with: pg_ctl -D "$STACKKIT_PG_DIR/data" stop (as the cluster owner).
set -euo pipefail
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$bindir/initdb" ] || { echo "pg_throwaway: PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }
owner=postgres
id "$owner" >/dev/null 2>&1 || owner=$(id -un)
as_owner() { if [ "$(id -un)" = "$owner" ]; then "$@"; else runuser -u "$owner" -- "$@"; fi; }
dir=$(mktemp -d /tmp/stackkit-pg.XXXXXX)
chown "$owner" "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
echo postgres > "$dir/pw"; chown "$owner" "$dir/pw"
as_owner "$bindir/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pw" --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1
as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=200 -c fsync=off" start >/dev/null
as_owner "$bindir/psql" -h "$dir" -p "$port" -U postgres -v ON_ERROR_STOP=1 -q \
  -c "CREATE ROLE stackkit LOGIN PASSWORD 'stackkit'" -c "CREATE DATABASE stackkit OWNER stackkit" >/dev/null
echo "export STACKKIT_TEST_POSTGRES_URL=postgresql+psycopg2://stackkit:stackkit@127.0.0.1:$port/stackkit"
echo "export STACKKIT_PG_DIR=$dir STACKKIT_PG_BIN=$bindir STACKKIT_PG_OWNER=$owner"
