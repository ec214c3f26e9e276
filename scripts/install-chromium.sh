#!/usr/bin/env bash
# Installs Debian's headless Chromium and its WebDriver for the console's browser test
# (tests/cli/browser.rs). Idempotent; needs root (CI and the development machines run
# as root).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
