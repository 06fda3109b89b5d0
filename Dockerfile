# syntax=docker/dockerfile:1
#
# ws-gateway image: glibc release build on Debian 12, run on distroless
# cc-debian12 (glibc, CA certificates, tzdata, no shell, no package manager)
# as uid/gid 65532.
#
#   docker build -t registry.example.com/ws-gateway:0.1.0 .
#
# Base images are pinned by digest, so a rebuild starts from the same bytes;
# the tag beside each digest says what it was taken from. The digests were
# copied from public pins of these tags (not pulled and checked on the machine
# that wrote this file): verify and refresh them with
#   docker buildx imagetools inspect rust:1.91-bookworm
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot
# (or let Renovate/Dependabot bump them). Both are Debian 12 (glibc 2.36), so
# the binary built in one runs in the other. Rust 1.91: the locked
# dependencies need 1.89.
#
# Layers: the dependencies are built first from Cargo.toml and Cargo.lock only
# (with stand-in sources), so an edit to src/ rebuilds only the crate, and an
# edit to anything else (README, k8s/, tests/) rebuilds nothing: the context
# holds only what .dockerignore lets through.

FROM rust:1.91-bookworm@sha256:c1e5f19e773b7878c3f7a805dd00a495e747acbdc76fb2337a4ebf0418896b33 AS builder
WORKDIR /src
# 1. Dependencies: the manifests, the lock file and empty stand-ins for the
# targets. Cargo reads every workspace member's manifest (bench/loadgen/, the
# load generator), though only the gateway is built here.
COPY Cargo.toml Cargo.lock ./
COPY bench/loadgen/Cargo.toml bench/loadgen/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    mkdir -p src bench/loadgen/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > bench/loadgen/src/main.rs \
 && : > src/lib.rs \
 && cargo build --release --locked --bin ws-gateway \
 && rm -rf src
# 2. The crate itself. touch: COPY keeps the files' modification times, which
# may be older than the stand-ins' build, and cargo would skip the rebuild.
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin ws-gateway \
 && install -D -m 0755 target/release/ws-gateway /out/ws-gateway
# Kubernetes preStop hook: the image has no shell and the binary no sleep
# flag, so a lone coreutils `sleep` (needs only libc, which the runtime image
# has from the same Debian release) lets `exec: [/usr/local/bin/sleep, "5"]`
# work on every Kubernetes version. See k8s/README.md, "Drain timeline".
RUN install -D -m 0755 /usr/bin/sleep /out/sleep

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
LABEL org.opencontainers.image.title="ws-gateway" \
      org.opencontainers.image.description="TLS edge for WebSocket traffic: JWT at the upgrade, Origin policy, raw relay" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/ws-gateway /usr/local/bin/ws-gateway
COPY --from=builder /out/sleep /usr/local/bin/sleep
# The example configuration, for the build-time check below and as a starting
# point (the pods take their settings from env vars instead).
COPY scripts/config.example.toml /etc/ws-gateway/config.example.toml
# The :nonroot tag already runs as 65532; numeric so runAsNonRoot can verify it.
USER 65532:65532
# Fail the build if the binary does not start in this image (missing shared
# libraries) or refuses the example configuration. Exec form: no shell here.
# --check-config opens no socket and needs no network.
RUN ["/usr/local/bin/ws-gateway", "--check-config", "--config", "/etc/ws-gateway/config.example.toml"]
# 8080: WebSocket upgrades and GET /healthz. 9090: /healthz, /readyz, /metrics
# (set ADMIN_LISTEN_ADDR=0.0.0.0:9090 to reach it from outside the container).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/ws-gateway"]
