# DreamBooth Box — Linux image (NVIDIA GPUs through the NVIDIA Container Toolkit; runs on a CPU too).
#
#   make build                                     # what you normally run (adds the build args below)
#   DOCKER_BUILDKIT=1 docker build -t dreambooth:0.1.0 .
#   DOCKER_BUILDKIT=1 docker build --target test -t dreambooth:0.1.0-test .    # + pytest and the tests
#
# Needs BuildKit (cache and secret mounts); no `# syntax=` line, so no frontend image is pulled.
# Optional secret `ca`: a CA bundle for a TLS-intercepting proxy (`--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt`).
# It is mounted only into the RUN steps that download and never stored in a layer; without it the build uses the
# base image's own trust store.

# Pinned base (Debian 12 "bookworm", python3.11). Override: --build-arg BASE_IMAGE=debian@sha256:... or a local image.
ARG BASE_IMAGE=debian:bookworm-20251229-slim

# ---------------------------------------------------------------------------------------------------------------
# base: the OS layer both the builder and the runtime start from
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
# Keep downloaded .debs in the BuildKit cache mount instead of deleting them (the official image's docker-clean).
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    --mount=type=secret,id=ca \
    rm -f /etc/apt/apt.conf.d/docker-clean \
    && echo 'Binary::apt::APT::Keep-Downloaded-Packages "true";' > /etc/apt/apt.conf.d/keep-cache \
    && if [ -s /run/secrets/ca ]; then echo 'Acquire::https::CAInfo "/run/secrets/ca";' > /etc/apt/apt.conf.d/99ca; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3 tini ca-certificates \
    && rm -f /etc/apt/apt.conf.d/99ca

# ---------------------------------------------------------------------------------------------------------------
# builder: the locked Python stack (hash-checked) in /opt/venv — the big, rarely changing part
FROM base AS builder
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then echo 'Acquire::https::CAInfo "/run/secrets/ca";' > /etc/apt/apt.conf.d/99ca; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -f /etc/apt/apt.conf.d/99ca
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_DEFAULT_TIMEOUT=120
RUN python3 -m venv /opt/venv
COPY requirements/lock.txt /tmp/requirements/lock.txt
# Every package comes from requirements/lock.txt, hash-checked; --no-deps: the lock is complete, nothing else sneaks in.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/requirements/lock.txt
# DeepSpeed is published as source only and its setup imports torch: built here, against the torch just installed
# (no build isolation), pure Python — its kernels compile on first use where a compiler is (DeepSpeed's JIT)
COPY requirements/deepspeed-lock.txt /tmp/requirements/deepspeed-lock.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
    && DS_BUILD_OPS=0 /opt/venv/bin/pip install --require-hashes --no-deps --no-build-isolation \
        -r /tmp/requirements/deepspeed-lock.txt

# wheel: builds the dreambooth wheel with setuptools from requirements/dev-lock.txt (hash-checked, no build isolation)
FROM builder AS wheel
COPY requirements/dev-lock.txt /tmp/requirements/dev-lock.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
    && python3 -m venv /opt/buildtools \
    && /opt/buildtools/bin/pip install --require-hashes --no-deps -r /tmp/requirements/dev-lock.txt
COPY pyproject.toml README.md /src/
COPY dreambooth /src/dreambooth
RUN /opt/buildtools/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels /src

# ---------------------------------------------------------------------------------------------------------------
# runtime: what users run
FROM base AS runtime
# User 1000 in group 0; every directory it writes is group 0 and g+rwX (setgid), so `--user ANY_UID:0` and
# OpenShift-style arbitrary uids work too. `--user $(id -u):$(id -g)` with host-owned volumes works as well.
RUN useradd --uid 1000 --gid 0 --no-create-home --home-dir /home/dreambooth --shell /bin/bash dreambooth \
    && mkdir -p /home/dreambooth /models /data /output /cache /workspace \
    && chown 1000:0 /home/dreambooth /models /data /output /cache /workspace \
    && chmod 2775 /home/dreambooth /models /data /output /cache /workspace
COPY --from=builder /opt/venv /opt/venv
# The containers run with a read-only root filesystem (compose.yaml, README "Security"): caches go to the /cache
# volume (torch.compile and triton load the kernels they build, which /tmp, a noexec tmpfs, would refuse), and
# HOME falls back to /tmp/home-UID where it is not writable (entrypoint.sh).
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/dreambooth \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DIFFUSERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TORCH_HOME=/cache/torch \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DREAMBOOTH_OUTPUT=/output
COPY requirements/lock.txt requirements/deepspeed-lock.txt /opt/dreambooth/requirements/
COPY docker/assert_stack.py /opt/dreambooth/assert_stack.py
# Build-time proof that the locked stack is what is installed and that it works here (the build fails otherwise).
RUN python /opt/dreambooth/assert_stack.py /opt/dreambooth/requirements/lock.txt \
    /opt/dreambooth/requirements/deepspeed-lock.txt
# The project itself: a small layer on top of the big one, so code changes rebuild only this.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps --no-index --no-cache-dir --disable-pip-version-check /wheels/dreambooth-*.whl \
    && dreambooth --version
COPY entrypoint/entrypoint.sh /usr/local/bin/entrypoint.sh
COPY docker/train.sh /opt/dreambooth/train.sh
RUN chmod 0755 /usr/local/bin/entrypoint.sh /opt/dreambooth/train.sh
WORKDIR /workspace
USER 1000:0
VOLUME ["/models", "/data", "/output", "/cache"]
# tini is PID 1: forwards SIGTERM to dreambooth (which saves a checkpoint and exits 130) and reaps zombies.
# Give it time: `docker stop -t 120` / compose stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint.sh"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------------
# test: the runtime plus pytest (requirements/dev-lock.txt) and the tests, for `make test-image`
FROM runtime AS test
USER 0:0
# Debian's Chromium (from the base image's own apt sources): tests/test_report.py renders report.html in it,
# headless, and checks that every image loads and nothing is fetched from outside the run folder; Playwright drives
# it for tests/test_ui_browser.py (its driver, a node binary in the wheel, needs libatomic)
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then echo 'Acquire::https::CAInfo "/run/secrets/ca";' > /etc/apt/apt.conf.d/99ca; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends chromium fonts-dejavu-core libatomic1 \
    && rm -f /etc/apt/apt.conf.d/99ca \
    && chromium --version
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    --mount=type=bind,source=requirements/dev-lock.txt,target=/tmp/dev-lock.txt \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
    && pip install --require-hashes --no-deps -r /tmp/dev-lock.txt
COPY pyproject.toml /src/pyproject.toml
COPY tests /src/tests
# bench/train.py's CPU smoke mode is part of the suite (the harness a GPU session runs; it reads the pins)
COPY bench /src/bench
COPY requirements/lock.txt /src/requirements/lock.txt
RUN chown -R 1000:0 /src && chmod -R g+rwX /src
WORKDIR /src
USER 1000:0
# The tests import the installed package (there is no dreambooth/ under /src), i.e. exactly what users run.
CMD ["python", "-m", "pytest", "-p", "no:cacheprovider"]

# ---------------------------------------------------------------------------------------------------------------
# image (the default target, last): the runtime plus OCI labels. Labels change every build, so they come last and
# invalidate nothing above.
FROM runtime AS image
ARG BASE_IMAGE
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="dreambooth" \
      org.opencontainers.image.description="DreamBooth fine-tuning of Stable Diffusion, offline: convert, class images, train, export" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# what `dreambooth run` records in OUTPUT/manifest.json as the image it ran in
ENV DREAMBOOTH_IMAGE_VERSION="${VERSION}" \
    DREAMBOOTH_IMAGE_REVISION="${REVISION}"
