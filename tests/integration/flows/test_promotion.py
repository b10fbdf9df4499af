"""The adapter registry on real PostgreSQL and a real S3 server, with real peft adapters."""

from __future__ import annotations

import io
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.domain.errors import Conflict, InvalidInput, NotFound
from pipeline.domain.revisions import EventsUsed
from pipeline.flows import promotion
from pipeline.flows.export import export
from pipeline.models.base import TINY_RANDOM_ID, ref, tiny_random
from pipeline.storage import registry as reg
from pipeline.storage.objects import CorruptObject, revision_prefix

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base():
    return tiny_random()


@pytest.fixture(scope="module")
def registry(stores):
    return stores.registry


def make_adapter(base_model, out: Path, seed: int, r: int = 4) -> Path:
    """A real PEFT LoRA directory with non-zero random weights (as after training)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_random(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(out)
    return out


def write(registry, base_model, tmp_path, user, seed, parent=None, **kw):
    d = make_adapter(base_model, tmp_path / f"a{seed}", seed)
    return registry.write_revision(
        user,
        d,
        parent_id=parent,
        base=ref(base_model, TINY_RANDOM_ID),
        training={"seed": seed, "steps": 3, "lr": 1e-3},
        events=EventsUsed.of([(f"e{seed}", seed)]),
        metrics={"holdout_nll": 1.0 / (seed + 1)},
        app="test",
        **kw,
    )


def user_id() -> str:
    return f"reg-{uuid.uuid4().hex[:8]}"


def test_export_then_stock_peft_load_gives_the_stored_tensors(registry, stores, base, tmp_path):
    u = user_id()
    src = make_adapter(base, tmp_path / "src", seed=1)
    rev = registry.write_revision(
        u,
        src,
        parent_id=None,
        base=ref(base, TINY_RANDOM_ID),
        training={"seed": 1},
        events=EventsUsed.of([("a", 3), ("b", 9)]),
        metrics={"holdout_nll": 2.5},
        app="test",
    )
    assert rev.status == "candidate" and rev.artifact_uri.endswith(
        f"{u}/revisions/{rev.revision_id}/adapter_model.safetensors"
    )
    m = rev.manifest
    assert m["base_model"] == {"id": TINY_RANDOM_ID, "sha256": ref(base, TINY_RANDOM_ID).sha256}
    assert m["adapter"]["rank"] == 4 and m["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert m["events"]["count"] == 2 and m["events"]["first_seq"] == 3 and m["events"]["last_seq"] == 9
    assert m["artifact"]["sha256"] == rev.sha256 and m["code_version"]

    out = tmp_path / "exported"
    export(stores, u, out, rev.revision_id)
    stored = load_file(src / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny_random(), out)  # stock peft, nothing of persona
    lora = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(lora) == len(stored) > 0
    for key, tensor in stored.items():
        match = [v for k, v in lora.items() if k.replace(".default", "").endswith(key.split("base_model.model.")[-1])]
        assert len(match) == 1, key
        assert torch.equal(match[0], tensor), key
    assert (out / "manifest.json").exists()


def test_revisions_are_immutable_and_writes_idempotent(registry, base, tmp_path, services):
    u = user_id()
    rid = "01JABCDEFGHJKMNPQRSTVWXYZ0"
    first = write(registry, base, tmp_path, u, seed=2, revision_id=rid)
    again = write(registry, base, tmp_path, u, seed=2, revision_id=rid)  # a retried write
    assert again.revision_id == first.revision_id and again.sha256 == first.sha256
    with pytest.raises(Conflict, match="immutable"):
        write(registry, base, tmp_path, u, seed=3, revision_id=rid)  # other bytes, same id
    with psycopg.connect(services.db.url) as conn:
        assert conn.execute("SELECT count(*) FROM revisions WHERE user_id = %s", (u,)).fetchone()[0] == 1
        with pytest.raises(psycopg.errors.CheckViolation, match="immutable"):
            conn.execute("UPDATE revisions SET sha256 = repeat('0', 64) WHERE revision_id = %s", (rid,))


def test_parent_must_belong_to_the_same_user(registry, base, tmp_path):
    a = write(registry, base, tmp_path, user_id(), seed=4)
    with pytest.raises(InvalidInput, match="belongs to"):
        write(registry, base, tmp_path, user_id(), seed=5, parent=a.revision_id)


def test_promote_and_rollback_are_compare_and_swap(registry, stores, announcer, base, tmp_path, services):
    u = user_id()
    r1 = write(registry, base, tmp_path, u, seed=6)
    r2 = write(registry, base, tmp_path, u, seed=7, parent=r1.revision_id)
    r3 = write(registry, base, tmp_path, u, seed=8, parent=r2.revision_id)

    assert promotion.promote(stores, announcer, u, r1.revision_id, expected=None).move.from_revision is None
    promotion.promote(stores, announcer, u, r2.revision_id, expected=r1.revision_id)
    # Two operators both saw r2 serving; the second one's change must fail and change nothing.
    promotion.promote(stores, announcer, u, r3.revision_id, expected=r2.revision_id)
    with pytest.raises(Conflict, match=f"expected {r2.revision_id}, it is now {r3.revision_id}"):
        promotion.promote(stores, announcer, u, r1.revision_id, expected=r2.revision_id)
    with psycopg.connect(services.db.url) as conn:
        assert reg.production(conn, u).revision_id == r3.revision_id
        statuses = {r.revision_id: r.status for r in reg.list_revisions(conn, u)}
    assert statuses == {r1.revision_id: "retired", r2.revision_id: "retired", r3.revision_id: "promoted"}
    assert registry.store.read_pointer(u)["revision"] == r3.revision_id

    move = promotion.rollback(stores, announcer, u).move  # to the one that served before r3
    assert (move.from_revision, move.to_revision, move.reason) == (r3.revision_id, r2.revision_id, "rollback")
    assert registry.store.read_pointer(u)["revision"] == r2.revision_id
    promotion.rollback(stores, announcer, u, to=r1.revision_id)
    with psycopg.connect(services.db.url) as conn:
        history = reg.alias_history(conn, u)
    assert [(m.from_revision, m.to_revision) for m in history] == [
        (None, r1.revision_id),
        (r1.revision_id, r2.revision_id),
        (r2.revision_id, r3.revision_id),
        (r3.revision_id, r2.revision_id),
        (r2.revision_id, r1.revision_id),
    ]
    assert registry.store.read_pointer(u)["sha256"] == r1.sha256


def test_concurrent_promotions_exactly_one_wins(registry, stores, announcer, base, tmp_path, services):
    u = user_id()
    root = write(registry, base, tmp_path, u, seed=9)
    promotion.promote(stores, announcer, u, root.revision_id)
    candidates = [write(registry, base, tmp_path, u, seed=10 + i, parent=root.revision_id) for i in range(6)]
    barrier = threading.Barrier(len(candidates))
    outcomes: list[str] = []

    def go(rev):
        barrier.wait()
        try:
            promotion.promote(stores, announcer, u, rev.revision_id, expected=root.revision_id)
            outcomes.append("won")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=go, args=(c,)) for c in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 5 + ["won"]
    with psycopg.connect(services.db.url) as conn:
        assert len(reg.alias_history(conn, u)) == 2


def test_rejected_revisions_are_not_promoted(registry, stores, announcer, base, tmp_path, services):
    u = user_id()
    r = write(registry, base, tmp_path, u, seed=20)
    with psycopg.connect(services.db.url) as conn:
        conn.execute("UPDATE revisions SET status = 'rejected' WHERE revision_id = %s", (r.revision_id,))
    with pytest.raises(InvalidInput, match="rejected"):
        promotion.promote(stores, announcer, u, r.revision_id)


def test_a_corrupted_object_is_refused_on_read(registry, stores, base, tmp_path):
    u = user_id()
    rev = write(registry, base, tmp_path, u, seed=21)
    key = revision_prefix(u, rev.revision_id) + "adapter_model.safetensors"
    data = bytearray(registry.store.get(key))
    data[-1] ^= 0xFF  # one flipped bit in the weights
    registry.store.client.put_object(registry.store.bucket, key, io.BytesIO(bytes(data)), len(data))
    out = tmp_path / "never"
    with pytest.raises(CorruptObject, match="corrupt"):
        export(stores, u, out, rev.revision_id)
    assert not out.exists()


def test_forget_removes_everything_of_one_user_only(registry, stores, announcer, base, tmp_path, services):
    from pipeline.demo import sim
    from pipeline.domain.events import split_of, validate
    from pipeline.storage.buffers import BufferedEvent, write_events

    gone, kept = user_id(), user_id()
    for u in (gone, kept):
        evs = [validate(e) for e in sim.events_for(sim.SimUser(u, sim.users(1)[0].style), 5, app="test")]
        with psycopg.connect(services.db.url) as conn, conn.transaction():
            write_events(conn, [BufferedEvent(e, split_of(e.user_id, e.event_id, 0.2)) for e in evs])
        r1 = write(registry, base, tmp_path, u, seed=30)
        r2 = write(registry, base, tmp_path, u, seed=31, parent=r1.revision_id)
        promotion.promote(stores, announcer, u, r1.revision_id)
        promotion.promote(stores, announcer, u, r2.revision_id)

    def counts(u):
        with psycopg.connect(services.db.url) as conn:
            return {
                t: conn.execute(f"SELECT count(*) FROM {t} WHERE user_id = %s", (u,)).fetchone()[0]
                for t in ("users", "user_state", "events", "revisions", "aliases", "alias_history")
            }

    kept_before, kept_objects = counts(kept), registry.store.list_user(kept)
    report = promotion.forget(stores, announcer, gone)
    assert report.rows["events"] == 5 and report.rows["revisions"] == 2 and report.rows["alias_history"] == 2
    assert len(report.objects) == 2 * 3 + 1  # two revision directories and the pointer
    assert counts(gone) == dict.fromkeys(kept_before, 0)
    assert registry.store.list_user(gone) == []
    assert counts(kept) == kept_before and registry.store.list_user(kept) == kept_objects
    assert promotion.forget(stores, announcer, gone).nothing


def test_operator_cli(registry, base, tmp_path, services, test_stack):
    u = user_id()
    r1 = write(registry, base, tmp_path, u, seed=40)
    r2 = write(registry, base, tmp_path, u, seed=41, parent=r1.revision_id)
    env = {
        "PERSONA_DB_URL": services.db.url,
        "PERSONA_S3_ENDPOINT": services.s3.endpoint,
        "PERSONA_STACK_DATA_DIR": str(test_stack.stack.data_dir),
        "PERSONA_KAFKA_BOOTSTRAP_SERVERS": services.kafka.bootstrap_servers,  # promote/rollback/forget announce
    }
    runner = CliRunner()

    def run(*args, code=0):
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == code, result.output
        return result.output

    assert "-> " + r1.revision_id in run("promote", u, r1.revision_id)
    assert "-> " + r2.revision_id in run("promote", u, r2.revision_id, "--expect", r1.revision_id)
    assert "changed concurrently" in str(
        runner.invoke(app, ["promote", u, r1.revision_id, "--expect", r1.revision_id], env=env).exception
    )
    tree = run("revisions", "lineage", u)
    assert r1.revision_id in tree and r2.revision_id in tree and "serving" in tree
    assert f"{r2.revision_id} -> {r1.revision_id} (rollback)" in run("rollback", u)
    assert r1.revision_id in run("revisions", "list", u, "--json")
    assert '"production": "' + r1.revision_id in run("users", "show", u, "--json")
    out = tmp_path / "export"
    assert "verified" in run("export", u, str(out))
    assert (out / "adapter_model.safetensors").exists()
    forgot = run("forget", u)
    assert "forgot" in forgot and "serving workers told to drop their cached copies" in forgot
    assert "nothing to remove" in run("forget", u)
    with pytest.raises(NotFound):
        with psycopg.connect(services.db.url) as conn:
            reg.get_user(conn, u)
