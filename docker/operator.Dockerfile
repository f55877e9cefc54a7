# syntax=docker/dockerfile:1
# The Tessera operator: `tessera-operator run`. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t tessera-operator:0.1.0 .

# Builder: the toolchain pinned in rust-toolchain.toml.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tessera-operator --bin tessera-operator \
 && install -D -m 0755 target/release/tessera-operator /out/tessera-operator

# Runtime: a small Debian image pinned to a point release (same glibc as the builder). The binary
# uses rustls, so only the CA bundle is copied in; no shell tools are needed at run time.
FROM debian:12.11-slim AS runtime
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/tessera-operator /usr/local/bin/tessera-operator
# 65532 is the conventional "nonroot" user; the chart runs it with a read-only root filesystem.
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/tessera-operator"]
CMD ["run"]
