# The locus binary on a slim Debian image, run as a non-root user.
# Build: docker build -t locus .      Run one region: docker run locus serve --config /etc/locus/regions/compose/eu.toml
#
# Dependencies are built in their own layer from a recipe of the manifests (cargo-chef), so a change
# to locus's own sources rebuilds locus alone, not every dependency.

FROM rust:1.95-slim-bookworm AS chef
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS plan
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=plan /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin locus
COPY . .
RUN cargo build --release --locked --bin locus

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin locus
COPY --from=build /src/target/release/locus /usr/local/bin/locus
COPY regions /etc/locus/regions
USER locus
EXPOSE 7101 7102 7103
# `locus health` asks LOCUS_HEALTH_URL (default http://127.0.0.1:7101/healthz); set it per region.
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s --retries=5 CMD ["locus", "health"]
ENTRYPOINT ["locus"]
CMD ["serve", "--config", "/etc/locus/regions/compose/eu.toml"]
