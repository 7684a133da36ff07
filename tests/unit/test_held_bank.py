"""A client's held bank weights (protofuse.adapted.HeldBank, from_task_files): a model whose
reply leaves the bank's weights out is verified over its complete file exactly as a full one,
and anything altered, on either side, is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from toys import toy_bank

from protofuse import artifacts, signing
from protofuse.adapted import KIND, HeldBank, from_files, from_task_files

KEY = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def models():
    bank, x, y = toy_bank()
    keep = np.isin(y, ("0", "1", "3"))
    first = bank.adapt(x[keep][:12], y[keep][:12], seed=0)
    second = bank.adapt(x[keep][12:24], y[keep][12:24], seed=1)
    return first, second, x


def _task_reply(model):
    """What the service sends when the caller holds the bank: the task's arrays alone."""
    files = model.to_files(KEY)
    return {**files, artifacts.WEIGHTS: artifacts.npz_bytes(model.task_arrays())}, files


def test_a_task_only_reply_verifies_and_predicts_as_the_full_model(models):
    first, second, x = models
    held = HeldBank.of(first)  # from the first (full) reply
    reply, full = _task_reply(second)
    task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
    model, files = from_task_files(reply, task, held, KEY.public_key())
    assert files == full  # the complete files, byte for byte what the server signed
    reference = from_files(full, KEY.public_key())
    np.testing.assert_array_equal(model.predict_proba(x), reference.predict_proba(x))
    assert model.task.model is not reference.task.model  # every model its own networks
    assert model.task.model is not first.task.model


def test_each_model_gets_its_own_networks_and_a_change_reaches_no_other_model(models):
    """Copied from networks built once: a caller changing one model's networks in place (say,
    fine-tuning it) changes neither the weights held nor any other model."""
    first, second, x = models
    held = HeldBank.of(first)
    reply, full = _task_reply(second)
    task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
    one, _ = from_task_files(reply, task, held, KEY.public_key())
    two, _ = from_task_files(reply, task, held, KEY.public_key())
    assert one.task.model is not two.task.model
    before = held.prefix.whole
    want = two.predict_proba(x)
    with torch.no_grad():
        for p in one.task.model.parameters():
            p.mul_(1.5)
    assert held.prefix.whole == before
    np.testing.assert_array_equal(two.predict_proba(x), want)
    again, files = from_task_files(reply, task, held, KEY.public_key())
    assert files == full
    np.testing.assert_array_equal(again.predict_proba(x), want)


def test_altered_held_weights_or_task_weights_are_refused(models):
    first, second, _ = models
    reply, _ = _task_reply(second)
    task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
    arrays = {k: v.copy() for k, v in HeldBank.of(first).prefix.arrays.items()}
    arrays[next(iter(arrays))] += 1.0
    bank = first.bank_meta
    damaged = HeldBank(artifacts.HashedPrefix.of(arrays), bank["family"], bank["config"])
    with pytest.raises(artifacts.ArtifactError, match="checksum mismatch"):
        from_task_files(reply, task, damaged, KEY.public_key())
    held = HeldBank.of(first)
    forged = {k: v + 0.5 for k, v in task.items()}
    with pytest.raises(artifacts.ArtifactError, match="checksum mismatch"):
        from_task_files(reply, forged, held, KEY.public_key())
    with pytest.raises(artifacts.ArtifactError, match="more than task arrays"):
        from_task_files(reply, {**task, "bank.extra": np.zeros(2)}, held, KEY.public_key())
    with pytest.raises(signing.SignatureError):
        from_task_files(reply, task, held, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(signing.SignatureError, match="no key"):
        from_task_files(reply, task, held)


def test_a_model_of_another_bank_configuration_is_refused(models):
    first, second, _ = models
    reply, _ = _task_reply(second)
    task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
    held = HeldBank.of(first)
    other = HeldBank(held.prefix, held.family, {**held.config, "feat_dim": 9})
    with pytest.raises(artifacts.ArtifactError, match="another bank configuration"):
        from_task_files(reply, task, other, KEY.public_key())


def test_the_verified_task_arrays_are_the_models_own(models):
    first, second, x = models
    reply, _ = _task_reply(second)
    task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
    model, _ = from_task_files(reply, task, HeldBank.of(first), KEY.public_key())
    before = model.predict_proba(x[:5])
    for v in task.values():  # the caller's arrays, changed after verification
        v[...] = 0
    np.testing.assert_array_equal(model.predict_proba(x[:5]), before)


def test_the_held_bank_shares_nothing_a_caller_can_change(models):
    """The prefix's arrays are read-only, and the configuration is the holder's own copy: a
    caller editing the model it was given changes nothing the next reply is checked against."""
    first, second, _ = models
    held = HeldBank.of(first)
    with pytest.raises(ValueError, match="read-only"):
        next(iter(held.prefix.arrays.values()))[...] = 0.0
    with pytest.raises(TypeError):
        held.prefix.arrays["bank.extra"] = np.zeros(2)  # type: ignore[index]
    first.bank_meta["config"]["feat_dim"] = 9
    reply, _ = _task_reply(second)
    task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
    model, _ = from_task_files(reply, task, held, KEY.public_key())
    assert model.classes_.tolist() == second.classes_.tolist()
    first.bank_meta["config"].pop("feat_dim")


def test_verifying_on_a_tail_takes_no_weights_it_could_mismatch(models):
    """verify(tail=) hashes the prefix's bytes and the tail: it refuses files that carry a
    weights.npz of their own (bytes it would not check), and a tail that is not the signed one."""
    first, second, _ = models
    held = HeldBank.of(first)
    reply, full = _task_reply(second)
    others = {k: v for k, v in full.items() if k != artifacts.WEIGHTS}
    task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
    tail = held.prefix.tail(task)
    meta = artifacts.verify(others, KIND, "m", KEY.public_key(), prefix=held.prefix, tail=tail)
    assert meta["sha256"] == json.loads(full[artifacts.META])["sha256"]
    with pytest.raises(ValueError, match=r"without weights\.npz"):
        artifacts.verify(full, KIND, "m", KEY.public_key(), prefix=held.prefix, tail=tail)
    with pytest.raises(artifacts.ArtifactError, match="checksum mismatch"):
        artifacts.verify(
            others, KIND, "m", KEY.public_key(), prefix=held.prefix, tail=tail[:-1] + b"x"
        )
