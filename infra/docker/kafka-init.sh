#!/bin/sh
# One-shot (docker-compose service `kafka-init`, image apache/kafka): create persona's topics with a fixed
# partition count (the partition count of a topic keyed by user id never changes afterwards) and the retention
# `persona forget` reports (how long a forgotten user's records stay in the topics).
set -eu
bootstrap=${PERSONA_KAFKA_BOOTSTRAP_SERVERS:-kafka:9092}
partitions=${PERSONA_KAFKA_PARTITIONS:-8}
retention_ms=${PERSONA_KAFKA_RETENTION_MS:-604800000}
for topic in "${PERSONA_KAFKA_TOPIC_EVENTS:-persona.interactions.v1}" \
             "${PERSONA_KAFKA_TOPIC_DLQ:-persona.interactions.dlq.v1}" \
             "${PERSONA_KAFKA_TOPIC_PROMOTIONS:-persona.promotions.v1}"; do
    /opt/kafka/bin/kafka-topics.sh --bootstrap-server "$bootstrap" --create --if-not-exists \
        --topic "$topic" --partitions "$partitions" --replication-factor 1 --config "retention.ms=$retention_ms"
    /opt/kafka/bin/kafka-configs.sh --bootstrap-server "$bootstrap" --alter --entity-type topics \
        --entity-name "$topic" --add-config "retention.ms=$retention_ms"  # also for a topic made before
done
/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$bootstrap" --describe | grep -E '^Topic: persona\.' || true
