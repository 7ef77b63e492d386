#!/bin/sh
# `compose run --rm [OPTIONS] SERVICE [ARGS...]`, but exiting with the container's own exit status.
#
#   COMPOSE="docker compose" docker/compose-run.sh -e MODEL= train --max-train-steps 10
#
# Why: compose v2 (seen with 2.29.7, 2.35.1 and 2.40.3 against Docker Engine 20.10, Debian bookworm's docker.io)
# returns 0 from `run` whatever the container returned, which would turn a failed `make test-image` or a failed
# training (exit 2/3) into a success. Here the container gets a name, its State.ExitCode is read with
# `docker inspect`, and the container (with its anonymous volumes) is removed afterwards, as --rm would.
set -u

compose="${COMPOSE:-docker compose}"
docker="${DOCKER:-docker}"
name="dreambooth-run-$$"

cleanup() { $docker rm -f -v "$name" >/dev/null 2>&1 || true; }
# Ctrl-C / SIGTERM: let the container save (its stop_grace_period), then clean up
# shellcheck disable=SC2329  # invoked by the trap below
on_signal() {
    $docker stop -t 120 "$name" >/dev/null 2>&1 || true
    cleanup
    exit 130
}
trap on_signal INT TERM

# shellcheck disable=SC2086  # $compose is "docker compose" or "docker-compose"
$compose run --name "$name" "$@"
rc=$?
code="$($docker inspect -f '{{.State.ExitCode}}' "$name" 2>/dev/null)" || code=""
cleanup
case "$code" in
    '' | 0) exit "$rc" ;;  # no container (compose itself failed), or the container succeeded: compose's status
    *) exit "$code" ;;
esac
