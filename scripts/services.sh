#!/usr/bin/env bash
# Make sure a MariaDB, a Redis and a PostgreSQL are reachable for the tests. When the usual ones
# (127.0.0.1:3306, 127.0.0.1:6379, 127.0.0.1:5432) answer, use them; otherwise start throwaway
# servers from the installed binaries on spare ports, and write their addresses to
# .test-services.env (read by scripts/test). When a binary is missing, fail with the command that installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f .test-services.env
RUN=${GATEWAY_TEST_RUN_DIR:-/tmp/gateway-test-services}
FORCE=${GATEWAY_TEST_THROWAWAY:-0}   # 1: start throwaway servers even if the usual ones answer

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

find_bin() {
    for b in "$@"; do
        command -v "$b" 2>/dev/null && return 0
        [ -x "/usr/sbin/$b" ] && { echo "/usr/sbin/$b"; return 0; }
    done
    return 1
}

wait_port() {
    for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
    echo "error: $2 did not start listening on 127.0.0.1:$1; see $RUN" >&2
    exit 1
}

if [ "$FORCE" = 1 ] || ! port_open 3306; then
    MARIADBD=$(find_bin mariadbd mysqld) || {
        echo "error: MariaDB is not running and not installed;" \
             "install it with: apt-get update && apt-get install -y mariadb-server" >&2
        exit 1
    }
    INSTALL_DB=$(find_bin mariadb-install-db mysql_install_db) || {
        echo "error: mariadb-install-db is missing;" \
             "install it with: apt-get update && apt-get install -y mariadb-server" >&2
        exit 1
    }
    PORT=13306
    if ! port_open $PORT; then
        rm -rf "$RUN/mariadb" && mkdir -p "$RUN/mariadb"
        "$INSTALL_DB" --no-defaults --datadir="$RUN/mariadb/data" --user="$(id -un)" \
            --auth-root-authentication-method=normal >"$RUN/mariadb/install.log" 2>&1
        nohup "$MARIADBD" --no-defaults --datadir="$RUN/mariadb/data" --user="$(id -un)" \
            --socket="$RUN/mariadb/mysqld.sock" --port=$PORT --bind-address=127.0.0.1 \
            --skip-name-resolve --pid-file="$RUN/mariadb/mysqld.pid" \
            >"$RUN/mariadb/server.log" 2>&1 &
        wait_port $PORT MariaDB
        # The fresh server's root has no password but only for localhost: let it in over TCP.
        "$(find_bin mariadb mysql)" --no-defaults --socket="$RUN/mariadb/mysqld.sock" -uroot -e \
            "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;"
    fi
    echo "export GATEWAY_TEST_MYSQL_PORT=$PORT" >>.test-services.env
    echo "tests: throwaway MariaDB on 127.0.0.1:$PORT"
fi

if [ "$FORCE" = 1 ] || ! port_open 6379; then
    REDIS=$(find_bin redis-server) || {
        echo "error: Redis is not running and not installed;" \
             "install it with: apt-get update && apt-get install -y redis-server" >&2
        exit 1
    }
    PORT=16379
    if ! port_open $PORT; then
        mkdir -p "$RUN/redis"
        "$REDIS" --daemonize yes --bind 127.0.0.1 --port $PORT --save "" --appendonly no \
            --dir "$RUN/redis" --logfile "$RUN/redis/server.log"
        wait_port $PORT Redis
    fi
    echo "export GATEWAY_TEST_REDIS_URL=redis://127.0.0.1:$PORT/0" >>.test-services.env
    echo "tests: throwaway Redis on 127.0.0.1:$PORT"
fi

if [ "$FORCE" = 1 ] || ! port_open 5432; then
    PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
        echo "error: PostgreSQL is not running and not installed;" \
             "install it with: apt-get update && apt-get install -y postgresql" >&2
        exit 1
    fi
    PORT=15432
    if ! port_open $PORT; then
        rm -rf "$RUN/postgres" && mkdir -p "$RUN/postgres"
        # initdb and postgres refuse to run as root: as root, run them as an unprivileged user.
        AS=()
        if [ "$(id -u)" = 0 ]; then
            PGUSER_OS=$(id -un postgres 2>/dev/null || echo nobody)
            chown "$PGUSER_OS" "$RUN/postgres"
            AS=(runuser -u "$PGUSER_OS" --)
        fi
        "${AS[@]}" "$PGBIN/initdb" -D "$RUN/postgres/data" -U root --auth=trust -E UTF8 \
            --no-sync >"$RUN/postgres/install.log" 2>&1
        "${AS[@]}" "$PGBIN/pg_ctl" -D "$RUN/postgres/data" -l "$RUN/postgres/server.log" -w \
            -o "-p $PORT -k $RUN/postgres -c listen_addresses=127.0.0.1 -c fsync=off" \
            start >/dev/null
        wait_port $PORT PostgreSQL
    fi
    echo "export GATEWAY_TEST_POSTGRES_PORT=$PORT" >>.test-services.env
    echo "tests: throwaway PostgreSQL on 127.0.0.1:$PORT"
fi
