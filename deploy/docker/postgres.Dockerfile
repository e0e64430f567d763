# PostgreSQL for CI (scripts/images.sh): Debian's PostgreSQL 15 from the base behind an
# entrypoint that honours the official image's interface — POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB, the data folder /var/lib/postgresql/data, `pg_isready` on PATH — so compose.yaml's
# environment, volume and health check are the ones users get with postgres:16-alpine.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
RUN install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
 && install -d -o postgres -g postgres /var/run/postgresql
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
