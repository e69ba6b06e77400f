#!/bin/sh
# Client-side check: sign a payload through the API and verify the signature with the service's public key.
set -eu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf 'hello from a client\n' > "$work/payload"
curl -fsS -X POST --data-binary @"$work/payload" http://127.0.0.1:8080/sign > "$work/payload.asc"
curl -fsS http://127.0.0.1:8080/pubkey > "$work/key.asc"
export GNUPGHOME="$work/gnupg"
mkdir -m 700 "$GNUPGHOME"
gpg --batch --quiet --import "$work/key.asc"
gpg --batch --verify "$work/payload.asc" "$work/payload"
