#!/usr/bin/env bash
# Mutation testing of the store and the dispatcher: cargo-mutants changes
# one thing at a time in src/store and src/dispatch (an operator, a
# condition, a return value) and checks that some test fails. Survivors are
# listed, with the reason each is acceptable, in TESTING.md.
#
#   scripts/mutants.sh                  # every group below, one after another
#   scripts/mutants.sh postgres         # needs a server: eval "$(scripts/postgres.sh start)"
#   scripts/mutants.sh dispatch         # one group
#   scripts/mutants.sh sqlite --re 'requeue|backlog'   # extra cargo-mutants arguments
#
# Each group runs the tests that exercise its files (running every test for
# every mutant would triple the time and catch nothing more). Results land
# in mutants.out/<group>/mutants.out (caught.txt, missed.txt, timeout.txt,
# unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null 2>&1 || cargo install cargo-mutants --locked

run_group() {
    local group=$1
    shift
    local files=() tests=()
    case "$group" in
    store)
        files=(-f src/store/mod.rs -f 'src/store/memory/*.rs' -f src/store/ack.rs
            -f src/store/report.rs -f src/store/row.rs -f src/store/operator.rs
            -f src/store/legacy.rs)
        tests=(--lib --test store_suite --test differential --test sqlite_store
            --test offline)
        ;;
    schema)
        files=(-f src/store/schema.rs)
        tests=(--lib --test sqlite_store --test migration --test guest)
        ;;
    sqlite)
        files=(-f 'src/store/sqlite/*.rs')
        tests=(--lib --test store_suite --test sqlite_store --test differential
            --test dispatch --test supervision --test guest --test offline)
        ;;
    dispatch)
        files=(-f src/dispatch/mod.rs -f src/dispatch/handler.rs -f src/dispatch/metrics.rs
            -f 'src/dispatch/destinations/*.rs' -f 'src/dispatch/runtime/*.rs')
        tests=(--lib --test dispatch --test supervision --test store_suite
            --test tracing_spans --test offline)
        ;;
    postgres)
        files=(-f 'src/store/postgres/*.rs')
        tests=(--lib --test postgres --test postgres_tls --test postgres_liveness
            --test store_suite --test differential)
        ;;
    edges)
        # The network edges of the binary: the HTTP front, the dashboard's
        # checks and sessions, what is shown of a connection string, and
        # what is redacted.
        files=(-f src/bin/outbox/http.rs -f src/bin/outbox/ui/mod.rs
            -f src/bin/outbox/ui/session.rs -f src/bin/outbox/db.rs
            -f src/bin/outbox/text.rs -f src/bin/outbox/relay/exec.rs)
        tests=(--bin outbox --test ui --test listener --test relay --test cli)
        ;;
    *)
        echo "unknown group: $group (store, schema, sqlite, dispatch, postgres, edges)" >&2
        exit 2
        ;;
    esac
    mkdir -p "mutants.out/$group"
    cargo mutants --all-features -j 1 --no-shuffle -o "mutants.out/$group" \
        "${files[@]}" "$@" -- "${tests[@]}"
}

if [ "$#" -eq 0 ]; then
    status=0
    for group in store schema sqlite dispatch postgres edges; do
        run_group "$group" || status=$?
    done
    exit "$status"
fi
run_group "$@"
