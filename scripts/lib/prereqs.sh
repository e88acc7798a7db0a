# shellcheck shell=bash
# scripts/lib/prereqs.sh — prerequisite checks shared by scripts/test, scripts/demo and .ci/run.
# Source it; it defines functions only.
#
#   pg_bindir          print the PostgreSQL bin directory holding initdb and postgres
#                      (TIDEPOOL_PG_BINDIR, else `pg_config --bindir`, else the newest
#                      /usr/lib/postgresql/*/bin), or fail
#   missing_prereqs    print one line per missing prerequisite (nothing if all present)
#   ensure_prereqs     install what is missing with apt-get when running as root, else print
#                      what to install; returns non-zero if something is still missing

pg_bindir() {
    local d
    if [[ -n "${TIDEPOOL_PG_BINDIR:-}" ]]; then
        if [[ -x "$TIDEPOOL_PG_BINDIR/initdb" && -x "$TIDEPOOL_PG_BINDIR/postgres" ]]; then
            echo "$TIDEPOOL_PG_BINDIR"
            return 0
        fi
        return 1
    fi
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if [[ -n "$d" && -x "$d/initdb" && -x "$d/postgres" ]]; then
            echo "$d"
            return 0
        fi
    fi
    d="$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    if [[ -x "$d/initdb" && -x "$d/postgres" ]]; then
        echo "$d"
        return 0
    fi
    return 1
}

missing_prereqs() {
    pg_bindir >/dev/null || echo "PostgreSQL server binaries (initdb, postgres)"
    command -v psql >/dev/null 2>&1 || echo "psql (on PATH)"
    command -v pgbench >/dev/null 2>&1 || echo "pgbench (on PATH)"
    command -v promtool >/dev/null 2>&1 || echo "promtool (Debian package prometheus; the metrics tests lint /metrics with it)"
    command -v prometheus >/dev/null 2>&1 || echo "prometheus (the metrics tests scrape tidepool with a real server)"
    command -v openssl >/dev/null 2>&1 || echo "openssl (the TLS tests make a throwaway CA with it)"
    if [[ "$(id -u)" == 0 ]] && ! id postgres >/dev/null 2>&1; then
        echo "the 'postgres' account (as root, scripts/pgcluster runs initdb/postgres as postgres)"
    fi
    return 0
}

# apt-get install without starting any service: package scripts that would start the
# PostgreSQL cluster they create are stopped by a temporary policy-rc.d (as in Docker images).
_prereqs_apt_install() {
    local policy=/usr/sbin/policy-rc.d added=0 status=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added=1
    fi
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
    } || status=$?
    if (( added )); then
        rm -f "$policy"
    fi
    return "$status"
}

_prereqs_list() {
    local line
    while IFS= read -r line; do
        echo "  - $line" >&2
    done <<<"$1"
}

ensure_prereqs() {
    local missing
    missing="$(missing_prereqs)"
    [[ -z "$missing" ]] && return 0
    echo "prerequisites missing:" >&2
    _prereqs_list "$missing"
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "installing postgresql, postgresql-contrib, prometheus and openssl with apt-get" >&2
        if ! _prereqs_apt_install postgresql postgresql-contrib prometheus openssl >&2; then
            echo "apt-get install failed" >&2
        fi
        missing="$(missing_prereqs)"
        [[ -z "$missing" ]] && return 0
        echo "still missing after apt-get install:" >&2
        _prereqs_list "$missing"
    fi
    cat >&2 <<'EOF'
tidepool's tests and demo need PostgreSQL installed locally (developed and tested with 15):
  - server binaries initdb and postgres, found via `pg_config --bindir`,
    /usr/lib/postgresql/*/bin, or TIDEPOOL_PG_BINDIR=/path/to/bin
  - psql and pgbench on PATH
  - when run as root: a `postgres` account (the server refuses to run as root)
  - promtool and prometheus (metrics tests), openssl (TLS tests)
Debian/Ubuntu: apt-get install postgresql postgresql-contrib prometheus openssl
EOF
    return 1
}
