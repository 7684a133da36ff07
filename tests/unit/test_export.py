"""ONNX export (protofuse.export): onnxruntime's output equals predict_proba for every encoder
(tabular, greyscale, colour, 64 x 64 images), the repository layout Triton reads, the class names
in the file's metadata, and a signature that covers the exported files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from toys import toy_bank

from protofuse import signing
from protofuse.export import (
    CONFIG_FILE,
    INPUT,
    LABELS_FILE,
    MODEL_FILE,
    OUTPUT,
    ExportError,
    export_onnx,
    verify_export,
)


def _adapted(image_shape=None, family="discriminative", classes=("0", "1", "3")):
    """A model adapted from a bank fitted briefly on the toy clusters, its inputs shaped as
    ``image_shape``."""
    bank, x, y = toy_bank(family, epochs=2, image_shape=image_shape, n=200)
    keep = np.isin(y, classes)
    return bank.adapt(x[keep][:30], y[keep][:30]), x


@pytest.mark.parametrize(
    "image_shape", [None, (12, 12), (12, 12, 3), (64, 64)], ids=["tabular", "grey", "colour", "64"]
)
def test_onnxruntime_equals_predict_proba_for_every_encoder(tmp_path, image_shape):
    model, x = _adapted(image_shape)
    done = export_onnx(model, tmp_path, "task")
    assert done.folder == tmp_path / "task" / "1" and done.parity <= 1e-5
    session = ort.InferenceSession(str(done.folder / MODEL_FILE))
    got = session.run([OUTPUT], {INPUT: x.astype(np.float32)})[0]
    np.testing.assert_allclose(got, model.predict_proba(x), atol=1e-5, rtol=0)
    assert (got.argmax(1) == model.predict_proba(x).argmax(1)).mean() > 0.99


def test_the_repository_is_what_triton_reads_and_the_file_names_its_classes(tmp_path):
    model, _ = _adapted()
    export_onnx(model, tmp_path, "digits-task", version=3)
    folder = tmp_path / "digits-task"
    assert (folder / LABELS_FILE).read_text().splitlines() == ["0", "1", "3"]
    config = (folder / CONFIG_FILE).read_text()
    assert 'name: "digits-task"' in config and 'backend: "onnxruntime"' in config
    assert "dims: [ -1, 16 ]" in config and "dims: [ -1, 3 ]" in config
    assert 'label_filename: "labels.txt"' in config
    proto = onnx.load(str(folder / "3" / MODEL_FILE))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == ["0", "1", "3"]
    assert meta["protofuse.family"] == "discriminative"
    assert [i.name for i in proto.graph.input] == [INPUT]
    assert [o.name for o in proto.graph.output] == [OUTPUT]
    # another version of the same task joins; another task under the same name is refused
    export_onnx(model, tmp_path, "digits-task", version=4)
    other, _ = _adapted(classes=("0", "1"))
    with pytest.raises(ExportError, match="describes another model"):
        export_onnx(other, tmp_path, "digits-task", version=5)
    assert not (folder / "5").exists()


def test_the_signature_covers_the_model_file_labels_and_configuration(tmp_path):
    model, _ = _adapted()
    key = signing.Ed25519PrivateKey.generate()
    folder = export_onnx(model, tmp_path, "task", signing_key=key).folder
    assert verify_export(folder, key.public_key())["key_id"] == signing.key_id(key.public_key())
    with pytest.raises(signing.SignatureError, match="signature does not verify"):
        verify_export(folder, signing.Ed25519PrivateKey.generate().public_key())
    for changed in (folder / MODEL_FILE, folder.parent / LABELS_FILE, folder.parent / CONFIG_FILE):
        original = changed.read_bytes()
        changed.write_bytes(original[:-2] + b"x\n")
        with pytest.raises(signing.SignatureError, match="another artifact"):
            verify_export(folder, key.public_key())
        changed.write_bytes(original)
    export_onnx(model, tmp_path, "task")  # re-exported unsigned: the old signature is gone
    with pytest.raises(signing.SignatureError, match="unsigned"):
        verify_export(folder, key.public_key())


@pytest.mark.parametrize("name", ["", "../up", "a/b", "-dash", "x" * 200, "sp ace"])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, name):
    model, _ = _adapted()
    with pytest.raises(ExportError, match="--name"):
        export_onnx(model, tmp_path / "repo", name)
    assert not (tmp_path / "repo").exists()


def test_the_generative_family_and_line_breaks_in_class_names_are_refused(tmp_path):
    generative, _ = _adapted(family="generative")
    with pytest.raises(ExportError, match="discriminative family"):
        export_onnx(generative, tmp_path, "g")
    model, _ = _adapted()
    model.classes_ = np.array(["0", "one\ntwo", "3"])
    with pytest.raises(ExportError, match="line break"):
        export_onnx(model, tmp_path, "m")
    assert not any(tmp_path.iterdir())


def test_protofuse_export_needs_a_trust_decision_and_writes_the_repository(tmp_path, capsys):
    from protofuse_cli.main import main

    model, _ = _adapted()
    model.save(tmp_path / "model")
    repo = tmp_path / "repo"
    assert main(["export", str(tmp_path / "model"), "--out", str(repo), "--name", "t"]) == 2
    assert "--unsigned-ok" in capsys.readouterr().err
    argv = ["export", str(tmp_path / "model"), "--out", str(repo), "--name", "t", "--unsigned-ok"]
    assert main(argv) == 0
    assert "onnxruntime within" in capsys.readouterr().err
    assert (repo / "t" / "1" / MODEL_FILE).exists()


def test_a_signed_version_moved_to_another_number_or_name_or_linked_no_longer_verifies(tmp_path):
    import shutil

    model, _ = _adapted()
    key = signing.Ed25519PrivateKey.generate()
    folder = export_onnx(model, tmp_path, "task", version=1, signing_key=key).folder
    shutil.copytree(folder, tmp_path / "task" / "7")  # rolled forward under a higher version
    with pytest.raises(signing.SignatureError, match="another artifact"):
        verify_export(tmp_path / "task" / "7", key.public_key())
    shutil.copytree(tmp_path / "task", tmp_path / "other")  # the same files under another name
    with pytest.raises(signing.SignatureError, match="another artifact"):
        verify_export(tmp_path / "other" / "1", key.public_key())
    (tmp_path / "task" / "8").symlink_to(folder)
    with pytest.raises(ExportError, match="not a folder"):
        verify_export(tmp_path / "task" / "8", key.public_key())
    with pytest.raises(ExportError, match="a link"):
        export_onnx(model, tmp_path, "task", version=8)


def test_exporting_the_encoder_never_touches_the_network_other_threads_predict_with():
    """torch's exporter swaps the traced network's parameters for fake tensors meanwhile: the
    graph is traced from a copy, so a service adapting and predicting on the same bank while it
    exports keeps giving the same answers."""
    import threading

    from protofuse.export import EncoderGraph, encoder_onnx

    model, x = _adapted((12, 12))
    served = dict(model.task.model.encoder.named_parameters())
    copied = dict(EncoderGraph(model.task).encoder.named_parameters())
    assert copied.keys() == served.keys()
    for name, p in copied.items():
        assert p.data_ptr() != served[name].data_ptr() and np.array_equal(
            p.detach().numpy(), served[name].detach().numpy()
        )
    want = model.predict_proba(x)
    exporter = threading.Thread(target=encoder_onnx, args=(model,))
    exporter.start()
    while exporter.is_alive():
        np.testing.assert_allclose(model.predict_proba(x), want, atol=1e-6, rtol=0)
    exporter.join()
