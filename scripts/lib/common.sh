# Shared helpers for scripts/*. Source it; do not run it.

LOGDIR=${STRATUS_LOGDIR:-$(pwd)/var/log}
mkdir -p "$LOGDIR"

# A tier's heading, with the disk space left where the checkout is (a full
# disk is the first thing to rule out when a tier fails).
step() {
  printf '\n\033[1m== %s ==\033[0m (%s free)\n' "$*" "$(df -h --output=avail . | tail -n 1 | tr -d ' ')"
}

require_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "this needs root (loop devices, mount, tgtd)" >&2
    exit 1
  fi
}

# Uses the machine's Rust toolchain; says how to get one when missing.
ensure_rust() {
  if ! command -v cargo >/dev/null; then
    [[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"
  fi
  if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (rustup, or Debian's cargo) and re-run" >&2
    exit 1
  fi
}

# Adds up cargo test's result lines into one closing line.
summarize() {
  local passed=0 failed=0 ignored=0 p f i
  while read -r p f i; do
    passed=$((passed + p)); failed=$((failed + f)); ignored=$((ignored + i))
  done < <(grep -h '^test result:' "$@" |
           sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/')
  echo
  echo "$passed passed, $failed failed"
}
