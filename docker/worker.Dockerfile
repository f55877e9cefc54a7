# syntax=docker/dockerfile:1
# The Tessera worker (CPU build): `tessera-worker serve` in worker pods and `tessera-worker agent`
# in the node-agent DaemonSet. NVML is loaded at run time from the library the NVIDIA container
# runtime mounts, so the agent works from this image too. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t tessera-worker:0.1.0 .

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tessera-worker --bin tessera-worker \
 && install -D -m 0755 target/release/tessera-worker /out/tessera-worker

FROM debian:12.11-slim AS runtime
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/tessera-worker /usr/local/bin/tessera-worker
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tessera-worker"]
CMD ["serve"]
