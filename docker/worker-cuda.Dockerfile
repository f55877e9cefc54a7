# syntax=docker/dockerfile:1
# The Tessera worker with CUDA (`--features cuda`). CUDA, cuBLAS and NCCL come from the runtime
# image; the GPU driver comes from the node through the NVIDIA container runtime. Build from the
# repository root:
#   docker build -f docker/worker-cuda.Dockerfile -t tessera-worker:0.1.0-cuda12.8 .

# The Rust toolchain, copied into the CUDA builder below (rustc's own binaries run on any
# glibc >= 2.17, so they work on Ubuntu 22.04).
FROM rust:1.95.0-bookworm AS rust

# Builder: the CUDA development image of the same CUDA version and Ubuntu release as the runtime,
# so the binary links against the runtime's glibc and finds nvcc should the build need it.
FROM nvidia/cuda:12.8.1-devel-ubuntu22.04 AS build
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tessera-worker --bin tessera-worker --features cuda \
 && install -D -m 0755 target/release/tessera-worker /out/tessera-worker

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS runtime
COPY --from=build /out/tessera-worker /usr/local/bin/tessera-worker
# cudarc loads NCCL as libnccl.so; the runtime image ships only the versioned libnccl.so.2.
RUN ln -s libnccl.so.2 /usr/lib/x86_64-linux-gnu/libnccl.so
# The CUDA base image runs as root by default; run as the unprivileged 65532 instead.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tessera-worker"]
CMD ["serve"]
