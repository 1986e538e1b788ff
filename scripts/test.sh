#!/usr/bin/env bash
# Runs every test against the local PostgreSQL, RabbitMQ and an aiosmtpd server that the
# tests start themselves. Installs the Python test tools first (aiosmtpd, dkimpy, jsonschema).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -d ../shared/contract ]]; then
    echo "error: ../shared/contract is missing; the tests read the contract and hard cases from there" >&2
    exit 2
fi

python3 -m pip install --quiet --disable-pip-version-check -r tests/support/requirements.txt

# Each test creates its own RabbitMQ vhost and PostgreSQL database, through rabbitmqctl and psql.
for tool in rabbitmqctl psql; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed; the tests need it" >&2; exit 2; }
done

cargo test --locked "$@"
