"""The pure parts of enrolment and auth: which adverts a scheduler believes, what a joining node
may serve, node states, records on the wire, the join limiter, JWTs and connect options."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import nkeys
import pytest

from broker_api.auth_cli import main as nats_auth_main
from broker_api.auth_cli import provider_models
from broker_api.enrolment import JoinLimiter
from broker_api.nats_auth import (
    CONNECT_MARGIN,
    MAX_CONTROL_LINE,
    MAX_USER_JWT,
    OLD_CONTROL_LINE,
    AuthDir,
    CredentialsTooLargeError,
    issued_publish,
    issued_user,
    role_permissions,
)
from broker_api.nats_jwt import decode_claims
from schemas import permissions, subjects
from schemas.codec import WireError, pack
from schemas.errors import RateLimitError
from schemas.jobs import ModelAdvert, NodeAdvert
from schemas.registry import EnrolToken, NodeRecord, Price, admit_advert, allowed_models, node_state, parse_token
from schemas.settings import NatsSettings, creds_path, found_creds, nats_options

RECORD = NodeRecord(
    id="nd-1", org="acme", pool="lab", kind="own", models=("a", "b"), created=1.0, user_key="UX", price=Price(1.0, 2.0)
)


def advert(**kw: object) -> NodeAdvert:
    base: dict[str, object] = {
        "node": "nd-1",
        "pool": "lab",
        "models": (ModelAdvert("a", input_price=99.0, output_price=99.0), ModelAdvert("c")),
        "slots_total": 4,
        "slots_free": 4,
        "kind": "own",
    }
    return NodeAdvert(**{**base, **kw})  # type: ignore[arg-type]


def test_an_enrolled_nodes_advert_keeps_to_its_enrolment_at_the_registrys_price() -> None:
    admitted = admit_advert(advert(), RECORD)
    assert admitted is not None
    assert [(m.id, m.input_price, m.output_price) for m in admitted.models] == [("a", 1.0, 2.0)]  # c dropped
    assert admit_advert(advert(pool="prov-a"), RECORD) is None
    assert admit_advert(advert(kind="volunteer"), RECORD) is None
    assert admit_advert(advert(kind="cloud"), RECORD) is None
    assert admit_advert(advert(models=(ModelAdvert("c"),)), RECORD) is None
    assert admit_advert(advert(), RECORD.replace(enabled=False)) is None
    assert admit_advert(advert(), RECORD.replace(removed=5.0)) is None
    unknown = advert(node="operator-worker")
    assert admit_advert(unknown, None) is unknown  # the operator's own


def test_what_a_joining_node_may_serve() -> None:
    assert allowed_models((), ("x", "y")) == ("x", "y")
    assert allowed_models(("x",), ()) == ("x",)
    assert allowed_models(("x", "z"), ("y", "z", "x")) == ("z", "x")
    assert allowed_models(("x",), ("y",)) == ()


def test_node_states() -> None:
    live = advert(interval=1.0)
    assert node_state(RECORD, live, 0.5) == "online"
    assert node_state(RECORD, advert(draining=True), 0.5) == "draining"
    assert node_state(RECORD, live, 5.0) == "stale"
    assert node_state(RECORD, live, 60.0) == "offline"
    assert node_state(RECORD, None, float("inf")) == "offline"
    assert node_state(RECORD.replace(enabled=False), live, 0.1) == "disabled"


def test_records_round_trip_and_garbage_is_a_wire_error() -> None:
    assert NodeRecord.decode(RECORD.encode()) == RECORD
    token = EnrolToken("t1", "d" * 64, "acme", "lab", "volunteer", ("a",), 1.0, 2.0, 3, used=1, creator="k")
    assert EnrolToken.decode(token.encode()) == token
    kind_cloud = pack({"id": "x", "org": "o", "pool": "p", "kind": "cloud"})  # enrolled nodes are own or volunteer
    for bad in (b"not msgpack \xc1", pack({"id": "x"}), kind_cloud):
        with pytest.raises(WireError):
            NodeRecord.decode(bad)
    with pytest.raises(WireError):
        EnrolToken.decode(pack({"id": "t"}))
    assert parse_token("tyj_abc_secret") == ("abc", "secret")
    assert parse_token("ty_abc_secret") is None and parse_token("tyj__x") is None


def test_a_token_says_why_it_is_unusable() -> None:
    token = EnrolToken("t1", "d", "o", "lab", "own", (), 0.0, 100.0, 2, used=0)
    assert token.unusable(50.0) == ("", "")
    assert token.unusable(100.0)[0] == "token_expired"
    assert EnrolToken("t1", "d", "o", "lab", "own", (), 0.0, 100.0, 2, used=2).unusable(50.0)[0] == "token_used_up"


def test_the_join_limiter_counts_per_address_within_a_minute() -> None:
    limiter = JoinLimiter(2)
    limiter.check("a", 0.0)
    limiter.check("a", 1.0)
    limiter.check("b", 1.0)
    with pytest.raises(RateLimitError) as e:
        limiter.check("a", 2.0)
    assert e.value.retry_after == pytest.approx(58.0)
    limiter.check("a", 61.0)  # the first attempt left the window


def test_jwts_chain_to_the_operator_and_stay_small(tmp_path: Path) -> None:
    auth = AuthDir.init(tmp_path, adapters={"openai": ("gpt-4o",)}, local_worker=True)
    text = creds_path(tmp_path, "api").read_text()
    jwt = text.split("-----BEGIN NATS USER JWT-----\n")[1].split("\n")[0]
    head, body, sig = jwt.split(".")
    claims = decode_claims(jwt)
    assert claims["iss"] == auth.keys.account.public and claims["nats"]["type"] == "user"
    signer = nkeys.from_seed(bytearray(auth.keys.account.seed))
    assert signer.verify(f"{head}.{body}".encode(), base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    account = decode_claims(auth.account_jwt({"UABC": 5}))
    assert account["iss"] == auth.keys.operator.public and account["nats"]["revocations"] == {"UABC": 5}
    assert account["nats"]["limits"]["disk_storage"] == -1  # JetStream on for the account
    # A user JWT travels in the CONNECT line. The server config that comes with every credential
    # raises nats-server's 4 KiB default to what issuing allows; each fixed role stays at 8 KiB,
    # so a grown permission list shows up here long before it matters.
    limit = int(re.search(r"max_control_line: (\d+)", auth.server_config(tmp_path / "jwt")).group(1))  # type: ignore[union-attr]
    assert limit == MAX_CONTROL_LINE > MAX_USER_JWT + 64 * 1024
    for role in ("api", "scheduler", "ledger", "worker", "adapter-openai"):
        issued = auth.issue(role, role_permissions(role))[0].split("\n")[1]
        assert len(issued) < 8192, (role, len(issued))
    assert AuthDir.open(tmp_path) is not None and AuthDir.open(tmp_path / "nothing") is None
    again = AuthDir.init(tmp_path)  # keeps its keys: credentials already handed out stay valid
    assert again.keys == auth.keys and creds_path(tmp_path, "api").read_text() == text


def test_credentials_too_long_for_a_connect_are_refused_when_issued(tmp_path: Path) -> None:
    """256 models of 100 characters fit (about a quarter of the room); ten times as long do not."""
    auth = AuthDir.init(tmp_path)
    many = [f"org-{i:03d}/" + "m" * 92 for i in range(256)]
    fits = auth.issue("node-a", permissions.node("nd-a", "lab", many))[0].split("\n")[1]
    assert 200_000 < len(fits) < MAX_USER_JWT // 3
    with pytest.raises(CredentialsTooLargeError) as e:
        auth.issue("node-b", permissions.node("nd-b", "lab", [m * 10 for m in many]))
    assert e.value.size > MAX_USER_JWT and "node-b" in str(e.value)


def test_credentials_are_held_to_the_connect_line_the_auth_dirs_config_sets(tmp_path: Path) -> None:
    """The limit follows nats-auth.conf: an older `auth init`'s 64 KiB (or none named) leaves
    64 KiB less a CONNECT line's other fields; 1 MiB or more, MAX_USER_JWT."""
    auth = AuthDir.init(tmp_path)
    assert auth.max_user_jwt() == MAX_USER_JWT
    conf = auth.conf_path.read_text()
    for line, limit in (
        ("max_control_line: 65536", 65536 - CONNECT_MARGIN),
        ("", OLD_CONTROL_LINE - CONNECT_MARGIN),
        ("max_control_line = 128KB", 128 * 1024 - CONNECT_MARGIN),
        ("max_control_line: 4MB", MAX_USER_JWT),
    ):
        auth.conf_path.write_text(conf.replace(f"max_control_line: {MAX_CONTROL_LINE}", line))
        assert auth.max_user_jwt() == limit, line
    models = [f"org-{i:03d}/" + "m" * 92 for i in range(80)]  # ~74 KB of credentials
    auth.issue("node-a", permissions.node("nd-a", "lab", models))
    auth.conf_path.write_text(conf.replace(f"max_control_line: {MAX_CONTROL_LINE}", "max_control_line: 65536"))
    with pytest.raises(CredentialsTooLargeError) as e:
        auth.issue("node-a", permissions.node("nd-a", "lab", models))
    assert e.value.limit == 65536 - CONNECT_MARGIN and str(e.value.limit) in str(e.value)


def test_node_permissions_name_only_its_own_consumers() -> None:
    p = permissions.node("nd-1", "lab", ["m"])
    assert "ty.fleet.hb.nd-1" in p.publish and "$JS.API.CONSUMER.MSG.NEXT.TY_WORK.work-lab-m" in p.publish
    assert not any(">" in s and not s.startswith(("$JS.ACK", "_INBOX_ty.lab.nd-1")) for s in (*p.publish, *p.subscribe))
    assert not p.responses


def test_connect_options_find_credentials_and_tls(tmp_path: Path) -> None:
    assert found_creds(str(tmp_path), ("scheduler",)) == ""
    creds_path(tmp_path, "worker").parent.mkdir(parents=True)
    creds_path(tmp_path, "worker").write_text("x")
    assert found_creds(str(tmp_path), ("adapter-openai", "worker")) == str(creds_path(tmp_path, "worker"))
    plain = nats_options(NatsSettings(url="nats://a:4222, nats://b:4222"), name="n")
    assert (
        plain["servers"] == ["nats://a:4222", "nats://b:4222"]
        and "tls" not in plain
        and "user_credentials" not in plain
    )
    assert plain["ping_interval"] == 10 and plain["max_reconnect_attempts"] == -1
    secured = nats_options(
        NatsSettings(url="tls://a:4222", creds="c.creds", tls_hostname="gw"), name="n", inbox_prefix="_I"
    )
    assert secured["user_credentials"] == "c.creds" and secured["tls"] is not None
    assert secured["tls_hostname"] == "gw" and secured["inbox_prefix"] == "_I"


def test_auth_init_holds_each_adapter_to_its_providers_models(tmp_path: Path) -> None:
    """`auth init --providers FILE` issues each adapter for its own models' consumers only; run
    again, it keeps credentials that still fit and issues again those whose models changed."""
    example = Path(__file__).resolve().parents[1] / "deploy" / "providers.example.yaml"
    out = tmp_path / "auth"
    extra = "--adapter", "extra=m-1,m-2"
    assert nats_auth_main(["init", "--out", str(out), "--providers", str(example), *extra]) == 0
    served = provider_models(example)
    assert served["openai"], served
    for name, models in {**served, "extra": ("m-1", "m-2")}.items():
        allowed = issued_publish(creds_path(out, f"adapter-{name}"))
        assert allowed == list(permissions.adapter(name, models).publish)
        assert not any(a.endswith(".*") and "MSG.NEXT" in a for a in allowed or ())  # no other consumer
        for model in models:
            assert f"$JS.API.CONSUMER.MSG.NEXT.TY_WORK.{subjects.work_consumer(name, model)}" in (allowed or [])
    before = {p.name: p.read_text() for p in (out / "creds").iterdir()}
    AuthDir.init(out, adapters={**served, "extra": ("m-1", "m-2")})
    assert {p.name: p.read_text() for p in (out / "creds").iterdir()} == before  # nothing re-issued
    assert AuthDir.init(out).revoked() == {}  # nothing replaced, nothing revoked
    earlier = issued_user(creds_path(out, "adapter-openai"))
    auth = AuthDir.init(out, adapters={**served, "openai": ("gpt-new",)})
    assert issued_publish(creds_path(out, "adapter-openai")) == list(
        permissions.adapter("openai", ("gpt-new",)).publish
    )
    assert creds_path(out, "api").read_text() == before["api.creds"]
    # the replaced file's user is revoked, for the gateway's pushes and in the preloaded account
    assert earlier is not None and list(auth.revoked()) == [earlier]
    assert issued_user(creds_path(out, "adapter-openai")) not in auth.revoked()
    preloaded = re.findall(r'"(eyJ[^"]+)"', auth.conf_path.read_text())
    accounts = [decode_claims(j)["nats"] for j in preloaded if decode_claims(j)["sub"] == auth.keys.account.public]
    assert [a.get("revocations") for a in accounts] == [auth.revoked()]


def test_an_adapter_is_never_issued_any_pools_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """However many models, an adapter's credentials name each one (a wildcard over consumer
    names would reach every pool's); none named, no work at all; `--adapters NAME`, which gave
    the wildcard, is refused, and so are more models than credentials can hold."""
    many = tuple(f"m{i}" for i in range(300))
    named = permissions.adapter("openai", many).publish
    # heartbeats, replies and orphan reports, then each model's four consumer subjects
    assert len(named) == 3 + 4 * len(many) and not any("TY_WORK.*" in p for p in named)
    assert not any("TY_WORK" in p for p in permissions.adapter("openai", ()).publish)
    out = str(tmp_path / "auth")
    assert nats_auth_main(["init", "--out", out, "--adapter", "openai=" + ",".join(many)]) == 0
    assert issued_publish(creds_path(out, "adapter-openai")) == list(named)
    assert nats_auth_main(["init", "--out", out, "--adapters", "openai"]) == 2
    assert "--adapter NAME=MODEL" in capsys.readouterr().err
    assert nats_auth_main(["init", "--out", out, "--adapter", "azure"]) == 2
    # one provider given twice would silently keep only its last models
    assert nats_auth_main(["init", "--out", out, "--adapter", "azure=a", "--adapter", "azure=b"]) == 2
    assert "given twice" in capsys.readouterr().err
    too_many = ",".join(f"{i:04d}-" + "m" * 200 for i in range(1000))
    assert nats_auth_main(["init", "--out", out, "--adapter", f"azure={too_many}"]) == 2
    assert "a NATS CONNECT line may hold" in capsys.readouterr().err
    assert not creds_path(out, "adapter-azure").exists()
