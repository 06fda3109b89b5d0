# syntax=docker/dockerfile:1
#
# ws-gateway image: glibc release build on Debian 12, run on distroless
# cc-debian12 (glibc, CA certificates, tzdata, no shell, no package manager)
# as uid/gid 65532.
#
#   docker build -t registry.example.com/ws-gateway:0.1.0 .
#
# The cache mounts need BuildKit (the default builder since Docker 23).

FROM rust:1-bookworm AS builder
WORKDIR /src
# Everything .dockerignore lets through: Cargo.toml, Cargo.lock, src/, and any
# other target directories the manifest names. Cargo reads every workspace
# member's manifest (bench/loadgen/), though only the gateway is built here.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ws-gateway \
 && install -D -m 0755 target/release/ws-gateway /out/ws-gateway
# Kubernetes preStop hook: the image has no shell and the binary no sleep
# flag, so a lone coreutils `sleep` (needs only libc, which the runtime image
# has from the same Debian release) lets `exec: [/usr/local/bin/sleep, "5"]`
# work on every Kubernetes version. See k8s/README.md, "Drain timeline".
RUN install -D -m 0755 /usr/bin/sleep /out/sleep

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="ws-gateway" \
      org.opencontainers.image.description="TLS edge for WebSocket traffic: JWT at the upgrade, Origin policy, raw relay" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/ws-gateway /usr/local/bin/ws-gateway
COPY --from=builder /out/sleep /usr/local/bin/sleep
# The :nonroot tag already runs as 65532; numeric so runAsNonRoot can verify it.
USER 65532:65532
# 8080: WebSocket upgrades and GET /healthz. 9090: /healthz, /readyz, /metrics
# (set ADMIN_LISTEN_ADDR=0.0.0.0:9090 to reach it from outside the container).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/ws-gateway"]
