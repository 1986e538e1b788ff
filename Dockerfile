# Two stages: build the release binary, then copy it into a slim runtime image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY config ./config
RUN cargo build --release --locked && strip target/release/outbound

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent outbound
COPY --from=build /src/target/release/outbound /usr/local/bin/outbound
COPY config/default.toml /etc/outbound/default.toml
USER outbound
# Listen on every interface inside the container so that Prometheus can scrape it.
ENV OUTBOUND_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/outbound"]
CMD ["worker"]
