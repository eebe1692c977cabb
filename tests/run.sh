#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine (root, Rust toolchain, Node present):
# installs what the tests need, then runs format and lint checks, the Rust tests
# (unit, integration, relay interop with coturn's tools, ACME against Pebble) and the
# browser tests in Chromium and Firefox.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null || need_apt+=(chromium)
command -v firefox-esr >/dev/null || need_apt+=(firefox-esr)
# Firefox captures a screen (the screen-share tests) only from a display: Xvfb.
command -v Xvfb >/dev/null || need_apt+=(xvfb)
command -v turnutils_uclient >/dev/null || need_apt+=(coturn)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# The ACME tests run Let's Encrypt's test CA (pebble, pebble-challtestsrv).
command -v pebble >/dev/null || need_apt+=(pebble)
# The browser tests run the server and the browsers in a network namespace (ip netns).
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nft >/dev/null || need_apt+=(nftables)
# The browser test of a call under CPU load runs a CPU hog beside it.
command -v stress-ng >/dev/null || need_apt+=(stress-ng)
# The cluster tests run a NATS server with JetStream.
command -v nats-server >/dev/null || need_apt+=(nats-server)
# The recording test reads the recorded file with ffprobe.
command -v ffprobe >/dev/null || need_apt+=(ffmpeg)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# coturn's package starts a system service on install; the tests start their own.
if command -v systemctl >/dev/null; then systemctl stop coturn 2>/dev/null || true; fi

if [ -f tests/browser/package.json ]; then
  echo "== installing browser test dependencies"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test (benches are built by clippy above and run with cargo bench)"
# The tools installed above are required here: a test that needs one fails instead of
# skipping (as it does on a machine without them).
MESHMEET_REQUIRE_TOOLS=1 cargo test --lib --bins --tests
if [ -f tests/browser/package.json ]; then
  # The call, relay, HTTPS-only and room-control tests in the Chromium and the Firefox
  # room, the pages and /check; recording and file sharing in the mixed room (both
  # browsers in one room). The mixed room of the call tests (MESHMEET_ROOMS=
  # chromium,firefox,mixed, or empty for every room) is not in this run yet: see the
  # README, "Browser tests".
  echo "== browser tests (Chromium and Firefox rooms, pages, /check, room control, recording, files)"
  cargo build --bin meshmeet
  (cd tests/browser && MESHMEET_ROOMS="${MESHMEET_ROOMS-chromium,firefox}" \
    MESHMEET_FEATURE_ROOMS="${MESHMEET_FEATURE_ROOMS-mixed}" \
    MESHMEET_BIN="$PWD/../../target/debug/meshmeet" npm run test:ci)
fi
