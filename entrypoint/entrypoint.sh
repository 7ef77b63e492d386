#!/bin/sh
# Container entry point (PID 1 is tini): a quick preflight with one-line errors and hints, then `exec dreambooth "$@"`.
#
#   docker run IMAGE train --config /data/run.toml     → preflight, then dreambooth train --config /data/run.toml
#   docker run IMAGE --help                            → dreambooth --help
#   docker run IMAGE python -c '...'                   → runs that program as is (any executable but `dreambooth`)
#
# Environment problems exit 3 (like `dreambooth` itself); warnings never stop a run.
#   DREAMBOOTH_REQUIRE_GPU=1     no GPU visible is an error instead of a notice (the compose *-gpu services set it)
#   DREAMBOOTH_MIN_FREE_GB=10    warn when /output has less free space than this
#   DREAMBOOTH_SKIP_PREFLIGHT=1  skip all of this
set -eu

EXIT_ENV=3
MIN_FREE_GB="${DREAMBOOTH_MIN_FREE_GB:-10}"

error() {
    printf 'error: %s\n' "$1" >&2
    if [ -n "${2:-}" ]; then printf 'hint: %s\n' "$2" >&2; fi
    exit "$EXIT_ENV"
}
warn() { printf 'warning: %s\n' "$1" >&2; }
notice() { printf 'notice: %s\n' "$1" >&2; }

# Did the user mount something at DIR? The image's VOLUME lines give every such directory an anonymous volume
# (.../volumes/<64 hex>/_data), which does not count: it disappears with the container and holds no inputs.
is_mounted() {
    awk -v dir="$1" '
        $5 == dir {
            n = split($4, part, "/")
            anonymous = (part[n] == "_data" && length(part[n - 1]) == 64 && part[n - 1] ~ /^[0-9a-f]+$/)
            if (!anonymous) found = 1
        }
        END { exit !found }' /proc/self/mountinfo 2>/dev/null
}

# nvidia (NVIDIA Container Toolkit), wsl (Docker Desktop on WSL2: /dev/dxg + /usr/lib/wsl/lib) or none
gpu_kind() {
    for dev in /dev/nvidia[0-9]*; do
        if [ -e "$dev" ]; then echo nvidia; return; fi
    done
    if [ -e /dev/dxg ]; then echo wsl; return; fi
    echo none
}

# The dreambooth command after the global options (--debug, --log-format X), or empty.
subcommand() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --log-format) if [ $# -lt 2 ]; then return 0; fi; shift 2 ;;
            -*) shift ;;
            *) echo "$1"; return ;;
        esac
    done
}

# Does any argument name a path under DIR (as `DIR/x` or `--flag=DIR/x`)?
references() {
    dir="$1"
    shift
    for arg in "$@"; do
        case "$arg" in
            "$dir" | "$dir"/* | *="$dir" | *="$dir"/*) return 0 ;;
        esac
    done
    return 1
}

check_gpu() {
    command="$1"
    kind="$(gpu_kind)"
    if [ "$kind" = wsl ]; then
        # Docker Desktop mounts the Windows driver's CUDA libraries here; torch finds libcuda.so.1 through this path.
        case ":${LD_LIBRARY_PATH:-}:" in
            *:/usr/lib/wsl/lib:*) ;;
            *) export LD_LIBRARY_PATH="/usr/lib/wsl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
        esac
        if [ ! -e /usr/lib/wsl/lib/libcuda.so.1 ]; then
            kind=none
            warn "WSL2 GPU device /dev/dxg is present but /usr/lib/wsl/lib/libcuda.so.1 is not"
        fi
    fi
    if [ "$kind" != none ]; then return 0; fi
    if [ "${DREAMBOOTH_REQUIRE_GPU:-0}" = 1 ]; then
        if [ -e /dev/dxg ] || grep -qsi microsoft /proc/sys/kernel/osrelease; then
            error "no GPU in the container (WSL2 host)" \
                "run with \`--gpus all\`, enable Docker Desktop's WSL2 backend and install a current Windows NVIDIA driver (nothing CUDA inside WSL)"
        fi
        error "no GPU in the container" \
            "run with \`--gpus all\` and install the NVIDIA Container Toolkit on the host (or unset DREAMBOOTH_REQUIRE_GPU to run on the CPU)"
    fi
    case "$command" in
        train | run | sample | demo)
            notice "no GPU in the container: running on the CPU (slow). For a GPU: \`--gpus all\` + the NVIDIA Container Toolkit"
            ;;
    esac
}

check_volumes() {
    # Inputs: a path under /models or /data is useless unless that directory is mounted.
    for dir in /models /data; do
        if references "$dir" "$@" && ! is_mounted "$dir"; then
            name="${dir#/}"
            error "$dir is not mounted, but the command reads from it" \
                "add \`-v \"\$PWD/$name:$dir:ro\"\` to docker run (compose mounts ./$name)"
        fi
    done

    # Output: must be writable when mounted or named; unmounted output is lost with the container.
    if is_mounted /output || references /output "$@"; then
        if [ ! -d /output ]; then
            error "/output does not exist in the container" "mount it: \`-v \"\$PWD/output:/output\"\`"
        fi
        if [ ! -w /output ]; then
            me="$(id -u):$(id -g)"
            owner="$(stat -c '%u:%g' /output 2>/dev/null || echo '?')"
            error "/output is not writable by this container's user $me (the directory belongs to $owner)" \
                "on the host \`sudo chown -R $me ./output\`, or run as the owner: \`--user \$(id -u):\$(id -g)\` (\`make\` does this)"
        fi
        if ! is_mounted /output; then
            warn "/output is not a volume: results are lost when the container is removed (add \`-v \"\$PWD/output:/output\"\`)"
        fi
        check_disk /output
    fi

    if is_mounted /cache && [ ! -w /cache ]; then
        warn "/cache is not writable by user $(id -u):$(id -g): caches go nowhere (chown ./cache on the host or use --user)"
    fi
}

check_disk() {
    free_kb="$(df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }')"
    case "$free_kb" in '' | *[!0-9]*) return 0 ;; esac
    if [ "$free_kb" -lt $((MIN_FREE_GB * 1024 * 1024)) ]; then
        warn "only $((free_kb / 1024 / 1024)) GB free on $1 (less than ${MIN_FREE_GB} GB): checkpoints and exports may not fit"
    fi
}

# An arbitrary --user may have no home directory and no passwd entry, and the root filesystem is read-only
# (README "Security"): give the libraries a writable HOME on /tmp (a tmpfs).
if [ ! -w "${HOME:-/nonexistent}" ]; then
    HOME="/tmp/home-$(id -u)"
    mkdir -p "$HOME"
    export HOME
fi
export USER="${USER:-dreambooth}" LOGNAME="${LOGNAME:-dreambooth}"

# Not a dreambooth command but a program in the image (python, bash, pytest, ...): run it as is.
if [ $# -gt 0 ]; then
    case "$1" in
        -* | convert | export | inspect | train | run | sample | doctor | demo | help) ;;
        dreambooth) shift ;;
        *)
            if command -v "$1" 2>/dev/null | grep -q /; then exec "$@"; fi
            ;;
    esac
fi

if ! command -v dreambooth >/dev/null 2>&1; then
    error "the dreambooth command is missing from this image" "rebuild it: \`make build\`"
fi

if [ "${DREAMBOOTH_SKIP_PREFLIGHT:-0}" != 1 ]; then
    command="$(subcommand "$@")"
    check_gpu "$command"
    case "$command" in
        train | run | convert | export | sample | demo) check_volumes "$@" ;;
    esac
fi

exec dreambooth "$@"
