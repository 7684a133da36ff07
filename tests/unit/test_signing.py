"""Keys, certificates and signed artifacts: ``protofuse certs init`` and Ed25519 on adapted
models."""

from __future__ import annotations

import json
import stat
import warnings

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from toys import clusters, two_experts

from protofuse import artifacts, signing
from protofuse.adapted import load_adapted
from protofuse.artifacts import ArtifactError
from protofuse.bank import fit_bank
from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings
from protofuse.signing import SignatureError
from protofuse_server.certs import CertsError, init

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    init(folder, names=["fusion.example.org", "10.1.2.3"], supernodes=2)
    return folder


@pytest.fixture(scope="module")
def model():
    x, y, _ = clusters(0)
    bank = fit_bank(
        two_experts(x, y),
        ModelSettings(family="discriminative", feat_dim=8, hidden=32),
        TrainingSettings(epochs=6, lr=5e-3),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    idx = np.concatenate([np.flatnonzero(y == c)[:3] for c in (0, 2, 3)])
    return bank.adapt(x[idx], y[idx].astype(str)), x


def test_certs_init_makes_a_chain_that_verifies_and_private_keys_only_the_owner_reads(certs):
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    for stem, usage in (
        ("server", x509.ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", x509.ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert = x509.load_pem_x509_certificate((certs / f"{stem}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
        assert usage in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        key = serialization.load_pem_private_key((certs / f"{stem}.key").read_bytes(), None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    sans = (
        x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert {"localhost", "superlink", "proxy", "service", "fusion.example.org"} <= set(
        sans.get_values_for_type(x509.DNSName)
    )
    assert {"127.0.0.1", "10.1.2.3"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    for private in (
        "ca.key",
        "server.key",
        "client.key",
        "signing.key",
        "supernodes/node-0.key",
        "supernodes/node-1.key",
    ):
        assert stat.S_IMODE((certs / private).stat().st_mode) == 0o600, private
    assert not (certs / "supernodes" / "node-2.key").exists()


def test_supernode_keys_are_p384_in_openssh_format_as_flower_wants(certs):
    private = serialization.load_ssh_private_key(
        (certs / "supernodes" / "node-0.key").read_bytes(), None
    )
    public = serialization.load_ssh_public_key((certs / "supernodes" / "node-0.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert isinstance(signing.load_private_key(certs / "signing.key"), ed25519.Ed25519PrivateKey)


def test_certs_init_never_overwrites_a_ca(certs):
    before = (certs / "ca.crt").read_bytes()
    with pytest.raises(CertsError, match="already holds a CA"):
        init(certs)
    assert (certs / "ca.crt").read_bytes() == before


def test_a_signed_model_loads_with_its_key_and_predicts_the_same(certs, model, tmp_path):
    adapted, x = model
    adapted.save(tmp_path / "m", signing_key=signing.load_private_key(certs / "signing.key"))
    loaded = load_adapted(tmp_path / "m", certs / "signing.pub")
    np.testing.assert_array_equal(loaded.predict_proba(x), adapted.predict_proba(x))
    record = json.loads((tmp_path / "m" / "signature.json").read_text())
    assert record["key_id"] == signing.key_id(signing.load_public_key(certs / "signing.pub"))


def test_altered_resigned_unsigned_or_foreign_models_are_refused(certs, model, tmp_path):
    adapted, _ = model
    key = signing.load_private_key(certs / "signing.key")
    pub = certs / "signing.pub"
    adapted.save(tmp_path / "m", signing_key=key)
    good = artifacts.read(tmp_path / "m", "protofuse-adapted-model")

    # An attacker changes the classes and recomputes the checksum: only the signature catches it.
    meta = json.loads(good["meta.json"])
    meta["classes"] = list(reversed(meta["classes"]))
    meta["sha256"] = artifacts.checksum(good["weights.npz"], meta)
    artifacts.write(tmp_path / "forged", {**good, "meta.json": json.dumps(meta).encode()})
    with pytest.raises(SignatureError, match="signature is for another artifact"):
        load_adapted(tmp_path / "forged", pub)
    # ... and re-signs it with a key of their own.
    other = ed25519.Ed25519PrivateKey.generate()
    artifacts.write(
        tmp_path / "resigned",
        {
            **good,
            "meta.json": json.dumps(meta).encode(),
            "signature.json": signing.sign("protofuse-adapted-model", meta["sha256"], other),
        },
    )
    with pytest.raises(SignatureError, match="does not verify with key"):
        load_adapted(tmp_path / "resigned", pub)
    # Weights changed without fixing the checksum: caught as corruption, key or not.
    artifacts.write(
        tmp_path / "corrupt", {**good, "weights.npz": good["weights.npz"][:-10] + b"0123456789"}
    )
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_adapted(tmp_path / "corrupt", pub)
    # No signature at all.
    adapted.save(tmp_path / "unsigned")
    with pytest.raises(SignatureError, match="unsigned"):
        load_adapted(tmp_path / "unsigned", pub)
    # A garbled signature file.
    artifacts.write(tmp_path / "garbled", {**good, "signature.json": b"{not json"})
    with pytest.raises(SignatureError, match="malformed"):
        load_adapted(tmp_path / "garbled", pub)


def test_opting_out_is_explicit_and_loading_without_either_warns(model, tmp_path):
    adapted, _ = model
    adapted.save(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapted(tmp_path / "m", unsigned_ok=True)  # no warning: the caller said so
    with pytest.warns(FutureWarning, match="without verifying who made it"):
        load_adapted(tmp_path / "m")


def test_keys_of_the_wrong_kind_are_named(certs, tmp_path):
    with pytest.raises(SignatureError, match="not an Ed25519 private key"):
        signing.load_private_key(certs / "server.key")
    with pytest.raises(SignatureError, match="not a PEM key"):
        signing.load_public_key(certs / "supernodes" / "node-0.pub")
    with pytest.raises(SignatureError, match="cannot read the key"):
        signing.load_public_key(tmp_path / "missing.pub")
