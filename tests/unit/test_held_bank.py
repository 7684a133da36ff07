"""A client's held bank weights (protofuse.adapted.HeldBank, from_task_files): a model whose
reply leaves the bank's weights out is verified over its complete file exactly as a full one,
and anything altered, on either side, is refused."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from toys import toy_bank

from protofuse import artifacts, signing
from protofuse.adapted import (
    KIND,
    BankPrefix,
    HeldBank,
    bank_arrays,
    from_files,
    from_task_files,
)

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
    feat_dim = first.bank_meta["config"]["feat_dim"]
    first.bank_meta["config"]["feat_dim"] = 9
    try:
        reply, _ = _task_reply(second)
        task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
        model, _ = from_task_files(reply, task, held, KEY.public_key())
        assert model.classes_.tolist() == second.classes_.tolist()
    finally:  # the fixture's model, as the other tests find it
        first.bank_meta["config"]["feat_dim"] = feat_dim


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


def test_the_service_writes_a_task_only_reply_as_the_task_arrays_npz_signed_whole(models):
    """to_files(bank_weights=False) is the reply the service sends a caller holding the bank:
    the task's arrays alone, with the checksum and signature of the complete file, by either
    way of writing it (appended to the prefix's bytes, or the whole file hashed)."""
    first, second, _ = models
    prefix = artifacts.HashedPrefix.of(bank_arrays(second.task.model))
    reply, full = _task_reply(second)
    assert second.to_files(KEY, prefix, bank_weights=False) == reply
    assert second.to_files(KEY, prefix) == full
    whole_hashed = dataclasses.replace(prefix, appends=False)
    assert second.to_files(KEY, whole_hashed, bank_weights=False) == reply
    held = HeldBank.of(first)
    _, files = from_task_files(
        reply, artifacts.npz_arrays(reply[artifacts.WEIGHTS]), held, KEY.public_key()
    )
    assert files == full
    # without the prefix, or with another bank's, the bank's part cannot be left out
    other = {k: v + 1.0 for k, v in prefix.arrays.items()}
    for wrong in (None, artifacts.HashedPrefix.of(other)):
        with pytest.raises(ValueError, match="do not begin"):
            second.to_files(KEY, wrong, bank_weights=False)


def _signed_with(model, change):
    """The model's complete files, its task arrays changed by ``change`` and signed anew (what
    a server that signs anything could send)."""
    arrays = model.arrays()
    change(arrays)
    files = artifacts.encode(KIND, arrays, model._meta(), KEY)
    task = {k: v for k, v in arrays.items() if k.startswith("task.")}
    return {**files, artifacts.WEIGHTS: artifacts.npz_bytes(task)}, task


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda a: a.update({"task.prototypes": np.zeros((3, 5), np.float32)}), "do not fit"),
        (lambda a: a.update({"task.log_temp": np.full_like(a["task.log_temp"], 100.0)}), "NaN"),
    ],
)
def test_a_task_that_cannot_predict_is_refused_after_others_have_loaded(models, change, why):
    """The probe prediction keeps the encoder's output per held bank (only the task's head
    runs again): a task whose head does not fit the encoder, or overflows, is refused all the
    same once other models have filled that memo."""
    first, second, x = models
    held = HeldBank.of(first)
    reply, _ = _task_reply(second)
    good, _ = from_task_files(
        reply, artifacts.npz_arrays(reply[artifacts.WEIGHTS]), held, KEY.public_key()
    )
    assert len(held._probes) == 1
    bad_reply, task = _signed_with(second, change)
    with pytest.raises(artifacts.ArtifactError, match=why):
        from_task_files(bad_reply, task, held, KEY.public_key())
    again, _ = from_task_files(
        reply, artifacts.npz_arrays(reply[artifacts.WEIGHTS]), held, KEY.public_key()
    )
    np.testing.assert_array_equal(again.predict_proba(x[:4]), good.predict_proba(x[:4]))


def test_a_bank_prefix_skips_the_byte_compare_only_for_its_own_unchanged_networks():
    """The service's prefix trusts a model's bank bytes without comparing them only while they
    are the very tensors it was made from at the same in-place versions: a copy of the networks,
    a parameter changed in place, running statistics updated by a forward pass in training mode
    or a tensor given other data through ``.data`` all send it back to the byte compare."""
    bank, x, y = toy_bank()
    keep = np.isin(y, ("0", "1", "3"))
    model = bank.adapt(x[keep][:12], y[keep][:12], seed=0)
    stamped = BankPrefix.of(bank.model)
    assert stamped.holds(model.task.model)  # adapting changed nothing in place
    for whole in (True, False):
        assert model.to_files(KEY, stamped, bank_weights=whole) == model.to_files(
            KEY, stamped.prefix, bank_weights=whole
        )
    assert not stamped.holds(copy.deepcopy(bank.model))
    with pytest.raises(ValueError, match="read-only"):  # the arrays are views of the networks
        next(iter(bank_arrays(bank.model).values()))[...] = 0.0

    def fresh() -> BankPrefix:
        return BankPrefix.of(bank.model)

    inputs = torch.from_numpy(x[:8])
    changes = [
        lambda: next(bank.model.parameters()).add_(0.5),
        lambda: (bank.model.train(), bank.model.embed(inputs), bank.model.eval()),
        lambda: setattr(bank.model.prototypes, "data", bank.model.prototypes.data + 0.5),
        # other data in the same memory, seen by its layout
        lambda: setattr(bank.model.bias, "data", bank.model.bias.data[:1]),
    ]
    for change in changes:
        prefix = fresh()
        with torch.no_grad():
            change()
        assert not prefix.holds(model.task.model)
        # compared byte for byte, the change is seen: the whole file is the changed networks'
        assert model.to_files(KEY, prefix) == model.to_files(KEY)
        with pytest.raises(ValueError, match="do not begin"):
            model.to_files(KEY, prefix, bank_weights=False)


def test_the_probe_memo_serves_only_the_held_networks_own_unchanged_copies(models):
    """Networks a caller changed after ``HeldBank.networks`` gave them, or networks from
    elsewhere, run the whole probe: NaN networks are refused even once the memo is filled."""
    first, second, _ = models
    held = HeldBank.of(first)
    reply, _ = _task_reply(second)
    task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
    from_task_files(reply, task, held, KEY.public_key())
    assert held._probes

    def poisoned(networks):
        for p in networks.parameters():
            if p.dim() == 2 and p.shape[0] > 8:  # an encoder layer
                with torch.no_grad():
                    p.fill_(float("nan"))
        return networks

    given = held.networks("test")
    assert held.gave(given)
    poisoned(given)
    assert not held.gave(given)
    elsewhere = poisoned(copy.deepcopy(first.task.model))
    for networks in (given, elsewhere):
        with pytest.raises(artifacts.ArtifactError, match="NaN"):
            from_task_files(reply, task, held, KEY.public_key(), networks=networks)


def test_models_loaded_on_many_threads_at_once_each_predict_as_the_full_model(models):
    """One client's concurrent calls share its held bank: networks given out, their stamps and
    the probe memo, all from several threads at once."""
    first, second, x = models
    held = HeldBank.of(first)
    reply, full = _task_reply(second)
    want = from_files(full, KEY.public_key()).predict_proba(x[:20])
    results: list = []

    def load() -> None:
        for _ in range(5):
            task = artifacts.npz_arrays(reply[artifacts.WEIGHTS])
            model, _ = from_task_files(
                reply, task, held, KEY.public_key(), networks=held.networks("t")
            )
            results.append(model.predict_proba(x[:20]))

    workers = [threading.Thread(target=load) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(results) == 40
    for got in results:
        np.testing.assert_array_equal(got, want)
    assert len(held._probes) == 1
