#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: installed from the
# distribution's packages when missing, run as an unprivileged user (the
# server refuses root), on a Unix socket in a temporary directory.
#
#   eval "$(scripts/postgres.sh start)"   # prints export OUTBOX_TEST_POSTGRES=... and PG_DIR=...
#   scripts/postgres.sh stop "$PG_DIR"
set -euo pipefail
port=54329

case "${1:-}" in
start)
    if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y postgresql >&2 || { apt-get update >&2 && apt-get install -y postgresql >&2; }
        else
            echo "postgres.sh: PostgreSQL is not installed (apt-get install postgresql)" >&2
            exit 1
        fi
    fi
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    dir=$(mktemp -d /tmp/outbox-pg.XXXXXX)
    as=()
    if [ "$(id -u)" = 0 ]; then
        chown nobody:nogroup "$dir"
        as=(runuser -u nobody --)
    fi
    "${as[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
        -o "-k $dir -p $port -c listen_addresses='' -c fsync=on" start >&2 ||
        { cat "$dir/log" >&2; exit 1; }
    echo "export PG_DIR=$dir"
    echo "export OUTBOX_TEST_POSTGRES='host=$dir port=$port user=postgres dbname=postgres'"
    ;;
stop)
    dir=${2:?the directory printed by start}
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    as=()
    if [ "$(id -u)" = 0 ]; then as=(runuser -u nobody --); fi
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast stop >&2 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start | stop DIR" >&2
    exit 2
    ;;
esac
