#!/bin/sh
# Make a private CA and a certificate for every service of docker-compose.yml (and of
# docker-compose.add-region.yml) in deploy/certs, or in the folder given. Run once before
# `docker compose up`; it keeps what exists, so running it again only adds what is missing.
#
# Each certificate names its service (and localhost, for health checks inside the container), and
# serves as a client certificate too: NATS servers verify each other's on routes and gateways, and
# the regions present theirs to NATS. To use real certificates instead, put your CA's certificate in
# ca.pem and each service's certificate and key in <service>.pem and <service>-key.pem (see the
# README's "TLS" section).
set -eu
out="${1:-$(dirname "$0")/certs}"
mkdir -p "$out"
cd "$out"
umask 077

if [ ! -f ca.pem ]; then
    echo "making the private CA: $out/ca.pem"
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout ca-key.pem -out ca.pem -days 825 -subj "/CN=locus compose CA" 2>/dev/null
fi

services=""
for region in eu us ap sa; do
    services="$services locus-$region pg-$region nats-$region-1 nats-$region-2 nats-$region-3"
done

for name in $services; do
    [ -f "$name.pem" ] && continue
    echo "making $out/$name.pem"
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$name-key.pem" -out "$name.csr" -subj "/CN=$name" 2>/dev/null
    printf '%s\n' \
        "subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1" \
        "extendedKeyUsage=serverAuth,clientAuth" \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
        -out "$name.pem" -days 825 -extfile "$name.ext" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
done
# Containers read them as users other than yours (each copies its key in place with the owner and
# mode its server wants); the CA's key stays yours alone.
chmod 644 ./*.pem
chmod 600 ca-key.pem
echo "certificates in $out (CA: ca.pem)"
