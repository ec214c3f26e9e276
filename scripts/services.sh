# Sourced by scripts/test.sh and scripts/bench.sh: makes sure RabbitMQ, NATS JetStream,
# PostgreSQL and MariaDB answer on 127.0.0.1, starting the local servers where it can, or that
# service of docker-compose.yml on a laptop with Docker.

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 5; i++)); do
    port_open "$1" && return 0
    sleep 0.2
  done
  echo "error: $2 does not answer on 127.0.0.1:$1 after $3 s" >&2
  return 1
}

start_rabbitmq() { command -v rabbitmq-server >/dev/null && rabbitmq-server -detached; }
start_nats() {
  command -v start-stop-daemon >/dev/null && [ -x /usr/sbin/nats-server ] &&
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
      -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}
start_postgres() {
  command -v pg_ctlcluster >/dev/null &&
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
}

start_mariadb() {
  local d
  for d in /usr/sbin/mariadbd /usr/sbin/mysqld; do
    if [ -x "$d" ] && command -v start-stop-daemon >/dev/null; then
      mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
      start-stop-daemon --start --oknodo --background --exec "$d"
      return
    fi
  done
  return 1
}

ensure() { # port name starter compose-service
  port_open "$1" && return 0
  echo "$2 is not running on 127.0.0.1:$1; starting it" >&2
  if ! "$3" 2>/dev/null; then
    if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
      # That one service only: never the worker image (its own profile in the file).
      docker compose up -d "$4"
    else
      echo "error: cannot start $2: install it locally or run 'docker compose up -d $4'" >&2
      return 1
    fi
  fi
  wait_port "$1" "$2" 90
}

ensure 5672 RabbitMQ start_rabbitmq rabbitmq
ensure 4222 "NATS JetStream" start_nats nats
ensure 5432 PostgreSQL start_postgres postgres
ensure 3306 MariaDB start_mariadb mariadb
# The storage tests use database `test` (MYSQL_URL, default root without a password).
if [ -z "${MYSQL_URL:-}" ] && command -v mysql >/dev/null; then
  mysql -h 127.0.0.1 -u root -e 'CREATE DATABASE IF NOT EXISTS test' >/dev/null 2>&1 || true
fi
# RabbitMQ opens its port a moment before it accepts work; wait until it says so.
if command -v rabbitmqctl >/dev/null; then rabbitmqctl -q await_startup --timeout 90 >/dev/null; fi

