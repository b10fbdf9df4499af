#!/bin/sh
# One-shot (docker-compose service `minio-init`, image minio/mc): create the adapters bucket if it is missing.
set -eu
mc alias set persona "http://${MINIO_ADDRESS:-minio:9000}" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "persona/${PERSONA_S3_BUCKET:-adapters}"
mc ls persona
