# Prometheus for CI (scripts/images.sh): Debian's prometheus package from the base, started the
# way the official prom/prometheus image starts it — the binary as entrypoint, compose.yaml's
# command as its flags, as user nobody, /prometheus owned by nobody so a fresh named volume
# takes that ownership.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN install -d -o nobody -g nogroup /prometheus /etc/prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
