#!/usr/bin/env bash
# Mutation testing of the store and the dispatcher: cargo-mutants changes
# one thing at a time in src/store and src/dispatch (an operator, a
# condition, a return value) and checks that some test fails. Survivors are
# listed, with the reason each is acceptable, in TESTING.md.
#
#   scripts/mutants.sh                     # everything (a few hours on 2 cores)
#   scripts/mutants.sh -f src/store/sqlite.rs   # one file
#
# Results land in ./mutants.out (caught.txt, missed.txt, timeout.txt,
# unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null 2>&1 || cargo install cargo-mutants --locked
files=()
if [ "$#" -eq 0 ]; then
    files=(-f 'src/store/*.rs' -f 'src/dispatch/*.rs')
fi
# The quick tier's tests that exercise these modules; the long reliability
# tier would add hours and catches nothing these do not.
exec cargo mutants --all-features -j 1 "${files[@]}" "$@" -- \
    --lib --test store_suite --test sqlite_store --test differential \
    --test dispatch --test supervision --test guest --test migration
