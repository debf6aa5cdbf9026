# The natrix image: `natrix` (every role) and `natrix-loadtest` (the chart's
# `helm test` uses it). Build from the repository root:
#
#   docker build -t natrix:0.1.0 .
#
# Multi-stage: a Rust toolchain builds release binaries; the runtime is a
# slim Debian with only the C library and CA certificates, running as an
# unprivileged user (65532) with nothing writable but what the chart mounts.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p natrix -p natrix-loadtest \
 && cp target/release/natrix target/release/natrix-loadtest /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 natrix \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin natrix
COPY --from=build /usr/local/bin/natrix /usr/local/bin/natrix-loadtest /usr/local/bin/
USER 65532:65532
# TURN/STUN, the TURN relay range is configured at run time; 8080 lookup,
# 9090 metrics and health.
EXPOSE 3478/udp 3478/tcp 3479/udp 5349/tcp 8080/tcp 9090/tcp
ENTRYPOINT ["/usr/local/bin/natrix"]
CMD ["up"]
