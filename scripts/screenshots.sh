#!/usr/bin/env bash
# Regenerates the dashboard's screenshots in docs/ (shown in the README):
# the demo outbox (examples/dashboard.rs), `outbox ui` on it, and headless
# Chromium from the distribution's packages.
#
#   scripts/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v chromium >/dev/null || { echo "needs chromium (apt-get install chromium)" >&2; exit 1; }
work=$(mktemp -d)
trap 'kill "${ui_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
cargo run -q --example dashboard -- "$work/app.db"
cargo build -q --features cli --bin outbox
target/debug/outbox --db "$work/app.db" ui --listen 127.0.0.1:0 --refresh 0 >"$work/url" &
ui_pid=$!
for _ in $(seq 100); do grep -q http "$work/url" 2>/dev/null && break; sleep 0.1; done
url=$(grep -o 'http://[^ ]*' "$work/url")
url=${url%/}
shot() { # NAME PATH [HEIGHT]
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$work/profile" --hide-scrollbars --window-size="1280,${3:-1400}" \
        --screenshot="docs/$1.png" "$url$2" 2>/dev/null
    echo "docs/$1.png"
}
failed=$(sqlite3 "$work/app.db" "SELECT id FROM outbox_events WHERE status = 'failed' AND event_type = 'webhook.post' ORDER BY seq DESC LIMIT 1")
shot dashboard-overview / 1500
shot dashboard-events "/events?status=failed" 1000
shot dashboard-event "/events/$failed" 1000
