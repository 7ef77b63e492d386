#!/bin/sh
# The compose `train` services' command: turns MODEL / DATA / CONFIG (host-style or container paths) into a
# dreambooth command line, then hands over to the entry point (preflight, then `exec dreambooth ...`).
#
#   CONFIG=./data/run.toml                → dreambooth run --config /data/run.toml
#   MODEL=./models/x.safetensors DATA=./data/alice [PROMPT="a photo of sks dog"]
#                                         → dreambooth train --model /models/x.safetensors --instance-data-dir /data/alice
#                                             --output /output [--instance-prompt ...]
#   nothing                               → dreambooth run --output /output   (no config: the built-in tiny demo)
# Extra arguments are appended (e.g. `docker compose run --rm train --max-train-steps 400`).
# GPUS=N (N > 1) trains with N processes, one per GPU (`--num-processes N`, DDP through accelerate).
# ADAPTER=lora trains a LoRA (`--adapter lora`, exported as the kohya/A1111 LoRA file); ADAPTER=full is the default.
set -eu

# ./models/x, models/x and /models/x all mean /models/x inside the container (same for data, output).
container_path() {
    case "$1" in
        /*) echo "$1" ;;
        ./*) echo "/${1#./}" ;;
        *) echo "/$1" ;;
    esac
}

output="$(container_path "${OUTPUT:-/output}")"
case "${GPUS:-}" in
    "" | 0 | 1) ;;
    *[!0-9]*)
        printf 'error: GPUS=%s is not a number of GPUs\n' "$GPUS" >&2
        printf 'hint: make train GPUS=2 (one training process per GPU)\n' >&2
        exit 2
        ;;
    *) set -- --num-processes "$GPUS" "$@" ;;
esac
case "${ADAPTER:-}" in
    "") ;;
    full | lora) set -- --adapter "$ADAPTER" "$@" ;;
    *)
        printf 'error: ADAPTER=%s is unknown\n' "$ADAPTER" >&2
        printf 'hint: make train ADAPTER=lora (a LoRA file) or ADAPTER=full (the whole model, the default)\n' >&2
        exit 2
        ;;
esac
if [ -n "${CONFIG:-}" ]; then
    set -- run --config "$(container_path "$CONFIG")" "$@"
elif [ -n "${MODEL:-}" ] || [ -n "${DATA:-}" ]; then
    if [ -z "${MODEL:-}" ] || [ -z "${DATA:-}" ]; then
        printf 'error: MODEL and DATA go together (MODEL=%s DATA=%s)\n' "${MODEL:-}" "${DATA:-}" >&2
        printf 'hint: make train MODEL=./models/v1-5-pruned.safetensors DATA=./data/alice, or CONFIG=./data/run.toml\n' >&2
        exit 2
    fi
    if [ -n "${PROMPT:-}" ]; then set -- --instance-prompt "$PROMPT" "$@"; fi
    set -- train --model "$(container_path "$MODEL")" --instance-data-dir "$(container_path "$DATA")" \
        --output "$output" "$@"
else
    set -- run --output "$output" "$@"
fi
exec /usr/local/bin/entrypoint.sh "$@"
