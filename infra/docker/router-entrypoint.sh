#!/bin/sh
# Render infra/nginx/persona-serving.conf.template the way `persona router config` does
# (pipeline/serving/router.py), then run nginx in the foreground.
#   persona-router          render into $PERSONA_ROUTER_RUN_DIR/nginx.conf and exec nginx
#   persona-router render   print the configuration and exit (tests compare it with `persona router config`)
set -eu

template=${PERSONA_ROUTER_TEMPLATE:-/etc/persona/persona-serving.conf.template}
run_dir=${PERSONA_ROUTER_RUN_DIR:-/var/run/persona-router}
listen=${PERSONA_ROUTER_LISTEN:-0.0.0.0:8080}
workers=${PERSONA_ROUTER_WORKERS:-}

servers=""
for w in $(printf '%s' "$workers" | tr ',' ' '); do
    host=${w%:*}
    port=${w##*:}
    case "$w" in *:*) ;; *) host="" ;; esac
    case "$port" in '' | *[!0-9]*) host="" ;; esac
    if [ -z "$host" ]; then
        echo "error: worker '$w' is not host:port (PERSONA_ROUTER_WORKERS)" >&2
        exit 2
    fi
    line="        server $w max_fails=2 fail_timeout=5s;"
    if [ -z "$servers" ]; then servers=$line; else servers="$servers
$line"; fi
done
if [ -z "$servers" ]; then
    echo "error: a serving pool needs at least one worker (PERSONA_ROUTER_WORKERS=host:port,...)" >&2
    exit 2
fi

render() {
    awk -v servers="$servers" -v listen="$listen" -v run_dir="$run_dir" '
        $0 == "@SERVERS@" { print servers; next }
        {
            gsub(/@LISTEN@/, listen)
            gsub(/@PID@/, run_dir "/nginx.pid")
            gsub(/@ERRORLOG@/, run_dir "/error.log")
            gsub(/@TEMP@/, run_dir)
            print
        }' "$template"
}

if [ "${1:-}" = "render" ]; then
    render
    exit 0
fi
mkdir -p "$run_dir"
render > "$run_dir/nginx.conf"
exec nginx -g 'daemon off;' -c "$run_dir/nginx.conf"
