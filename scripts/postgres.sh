#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: installed from the
# distribution's packages when missing, run as an unprivileged user (the
# server refuses root), on a Unix socket in a temporary directory.
#
#   eval "$(scripts/postgres.sh start)"   # exports OUTBOX_TEST_POSTGRES (the connection
#                                         # string) and OUTBOX_TEST_POSTGRES_DIR
#   scripts/postgres.sh restart "$OUTBOX_TEST_POSTGRES_DIR"   # a server fault, for tests
#   scripts/postgres.sh stop "$OUTBOX_TEST_POSTGRES_DIR"
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
    echo "export OUTBOX_TEST_POSTGRES_DIR=$dir"
    echo "export OUTBOX_TEST_POSTGRES='host=$dir port=$port user=postgres dbname=postgres'"
    ;;
restart)
    dir=${2:?the directory printed by start}
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    as=()
    if [ "$(id -u)" = 0 ]; then as=(runuser -u nobody --); fi
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -m fast -w restart >&2
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
    echo "usage: $0 start | restart DIR | stop DIR" >&2
    exit 2
    ;;
esac
