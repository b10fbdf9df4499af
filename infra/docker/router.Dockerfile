# The router of the serving pool: nginx with consistent hashing on the user in front of the `persona serve`
# workers. The configuration is infra/nginx/persona-serving.conf.template, rendered at start by
# router-entrypoint.sh exactly as `persona router config` renders it (tests/unit/test_infra.py compares the two).
#
#   docker build -f infra/docker/router.Dockerfile -t persona-router:dev .
#
# PERSONA_ROUTER_WORKERS: comma-separated host:port of the workers. A compose service name resolves to every
# replica when nginx starts, so `serving:8000` covers `docker compose up --scale serving=N` (restart the router
# after scaling). PERSONA_ROUTER_LISTEN: the address nginx listens on.

FROM nginx:1.27

ENV PERSONA_ROUTER_WORKERS=serving:8000 \
    PERSONA_ROUTER_LISTEN=0.0.0.0:8080 \
    PERSONA_ROUTER_RUN_DIR=/var/run/persona-router \
    PERSONA_ROUTER_TEMPLATE=/etc/persona/persona-serving.conf.template

COPY infra/nginx/persona-serving.conf.template /etc/persona/persona-serving.conf.template
COPY infra/docker/router-entrypoint.sh /usr/local/bin/persona-router
# curl for the compose health check (installed explicitly: not every nginx image tag carries it).
RUN (command -v curl >/dev/null || (apt-get update && apt-get install -y --no-install-recommends curl \
        && rm -rf /var/lib/apt/lists/*)) \
    && chmod 0755 /usr/local/bin/persona-router \
    && mkdir -p /var/run/persona-router \
    && ln -sf /dev/stderr /var/run/persona-router/error.log

EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/persona-router"]
