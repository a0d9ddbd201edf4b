#!/bin/sh
# `pip install "$@"` inside `docker build`, from the package sources the build arguments name.
#
# The Dockerfiles declare PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST and
# PIP_NO_INDEX as build arguments, which RUN sees as environment variables; pip reads them
# directly. An argument left empty is unset here, so pip keeps its own default rather than an
# empty index. PIP_CA_CERT carries a PEM certificate (a proxy's or a mirror's CA): it is added to
# the system bundle for pip's TLS checks and is not kept in the image.
set -eu
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_NO_INDEX; do
    eval "value=\${$var:-}"
    [ -n "$value" ] || unset "$var"
done
if [ -n "${PIP_CA_CERT:-}" ]; then
    bundle=$(mktemp)
    trap 'rm -f "$bundle"' EXIT
    cat /etc/ssl/certs/ca-certificates.crt > "$bundle" 2>/dev/null || true
    printf '%s\n' "$PIP_CA_CERT" >> "$bundle"
    export PIP_CERT="$bundle"
fi
unset PIP_CA_CERT
pip install "$@"
