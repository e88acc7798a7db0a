# tidepool container image.
#
#   docker build -t tidepool .        # BuildKit (the default builder since Docker 23)
#   docker compose up                  # with PostgreSQL: see docker-compose.yml
#
# The image runs `tidepool --config /etc/tidepool/tidepool.toml` (config/docker.toml: user
# `app` with $APP_DB_PASSWORD, database `app` on host `postgres`) as uid 10001. Override the config by mounting a file over /etc/tidepool/tidepool.toml, or by
# passing another command (`--config FILE`, or `--upstream postgres://...`); TIDEPOOL_CONFIG
# applies only when no --config is given, e.g. with `--entrypoint tidepool`.
# See docker-compose.yml and deploy/kubernetes/.

# --- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# change. A stub lib and main stand in for the sources; the stub's own build artifacts are
# then removed so that the real sources are always compiled afresh below.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src \
        target/release/.fingerprint/tidepool-* \
        target/release/deps/tidepool-* \
        target/release/deps/libtidepool-* \
        target/release/tidepool* \
        target/release/libtidepool*

COPY src ./src
RUN cargo build --release --locked \
    && ./target/release/tidepool --version

# --- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="tidepool" \
      org.opencontainers.image.description="A PostgreSQL connection pooler for the sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"

# ca-certificates only (for TLS to servers). Not version-pinned on purpose: it follows the
# bookworm-slim base, and a pinned Debian version disappears from the mirrors at the next
# point release and breaks the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tidepool \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tidepool

COPY --from=builder --chmod=0755 /build/target/release/tidepool /usr/local/bin/tidepool
# World-readable whatever the checkout's umask: tidepool runs as uid 10001, not as the owner.
COPY --chmod=0644 config/docker.toml /etc/tidepool/tidepool.toml

# 6432: Postgres protocol; 9930: HTTP admin (/livez /readyz /metrics /status).
EXPOSE 6432 9930

# SIGTERM starts tidepool's graceful drain (bounded by drain.timeout, 25s in
# config/docker.toml): give the container a longer stop timeout (docker stop -t 30,
# compose stop_grace_period: 30s, Kubernetes terminationGracePeriodSeconds: 30).
STOPSIGNAL SIGTERM

HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["tidepool", "healthcheck", "--url", "http://127.0.0.1:9930/readyz"]

USER 10001
ENTRYPOINT ["tidepool"]
CMD ["--config", "/etc/tidepool/tidepool.toml"]
