# Multi-stage build of coldgate's runtime image.
#   docker build -t coldgate:0.1.0 .
# The runtime stage is distroless (glibc and libgcc, no shell) and runs as the non-root
# user 65532, which is the user deploy/base/deployment.yaml expects.

FROM rust:1.95-bookworm AS build
# pingora-core builds zlib-ng through cmake.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
RUN cargo build --release --locked --bin coldgate \
    && strip target/release/coldgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/coldgate /usr/local/bin/coldgate
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/coldgate"]
CMD ["serve", "--config", "/etc/coldgate/coldgate.toml"]
