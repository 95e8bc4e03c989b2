#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: installed from the
# distribution's packages when missing, run as an unprivileged user (the
# server refuses root), on a Unix socket in a temporary directory.
#
#   eval "$(scripts/postgres.sh start)"   # exports OUTBOX_TEST_POSTGRES (the connection
#                                         # string) and OUTBOX_TEST_POSTGRES_DIR
#
# The server also listens on 127.0.0.1 and 127.0.0.2 with TLS on, its
# self-signed certificate naming localhost and 127.0.0.1 only
# (OUTBOX_TEST_POSTGRES_TLS: host, port and the CA file to verify it with);
# OUTBOX_TEST_POSTGRES_OTHER_CA is a CA that did not sign it; a second
# server speaks plain text only (OUTBOX_TEST_POSTGRES_PLAIN).
#   scripts/postgres.sh restart "$OUTBOX_TEST_POSTGRES_DIR"   # a server fault, for tests
#   scripts/postgres.sh stop "$OUTBOX_TEST_POSTGRES_DIR"
set -euo pipefail
# Fixed ports (a fresh CI machine has them free); set
# OUTBOX_TEST_POSTGRES_PORT to run a second set beside one already running.
port=${OUTBOX_TEST_POSTGRES_PORT:-54329}
plain_port=$((port + 1))

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
    "${as[@]}" "$bin/initdb" -D "$dir/plain" -A trust -U postgres >>"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }
    for name in server other; do
        openssl req -new -x509 -days 2 -nodes -subj "/CN=outbox test $name" \
            -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
            -keyout "$dir/$name.key" -out "$dir/$name.crt" >/dev/null 2>&1 ||
            { echo "postgres.sh: openssl could not make a certificate" >&2; exit 1; }
    done
    chmod 600 "$dir"/*.key
    [ "${#as[@]}" -eq 0 ] || chown nobody:nogroup "$dir"/*.key "$dir"/*.crt
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
        -o "-k $dir -p $port -c listen_addresses='127.0.0.1,127.0.0.2' -c fsync=on \
            -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key" start >&2 ||
        { cat "$dir/log" >&2; exit 1; }
    "${as[@]}" "$bin/pg_ctl" -D "$dir/plain" -l "$dir/plain.log" -w \
        -o "-k $dir -p $plain_port -c listen_addresses=127.0.0.1 -c ssl=off" start >&2 ||
        { cat "$dir/plain.log" >&2; exit 1; }
    echo "export OUTBOX_TEST_POSTGRES_DIR=$dir"
    echo "export OUTBOX_TEST_POSTGRES='host=$dir port=$port user=postgres dbname=postgres'"
    echo "export OUTBOX_TEST_POSTGRES_TLS='host=127.0.0.1 port=$port user=postgres dbname=postgres sslrootcert=$dir/server.crt'"
    echo "export OUTBOX_TEST_POSTGRES_OTHER_CA=$dir/other.crt"
    echo "export OUTBOX_TEST_POSTGRES_PLAIN='host=127.0.0.1 port=$plain_port user=postgres dbname=postgres'"
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
    [ ! -d "$dir/plain" ] || "${as[@]}" "$bin/pg_ctl" -D "$dir/plain" -m fast stop >&2 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start | restart DIR | stop DIR" >&2
    exit 2
    ;;
esac
