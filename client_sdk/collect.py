"""Query the experts a spec names on their query data, and pool the answers into triples.

This is the client's side of fusion done locally: resolve each expert's import path, load its
queries (plain ``.npy``, never pickle), query the black box once, validate what it returns.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from protofuse.model.networks import image_size
from protofuse.spec import ExpertEntry, Spec, SpecError
from protofuse.triples import Triples, assemble

from .experts import Expert, as_expert, query_expert


def resolve_expert(spec: Spec, entry: ExpertEntry) -> Expert:
    """The entry's black box: a model server over HTTP (``endpoint``), or ``module:attribute``
    imported with the spec's folder first on the import path (``predict``)."""
    if entry.endpoint is not None:
        from .model_servers import model_server_expert

        e = entry.endpoint
        try:
            return model_server_expert(
                e.protocol,
                e.url,
                entry.labels,
                model=e.model,
                version=e.version,
                output=e.output,
                timeout=e.timeout,
                retries=e.retries,
                batch_size=e.batch_size,
            )
        except (TypeError, ValueError) as err:
            raise SpecError(f"expert {entry.name!r}: endpoint: {err}") from None
    if entry.predict is None:  # the spec's validator requires one of the two
        raise SpecError(
            f"expert {entry.name!r}: give exactly one of predict = 'module:attribute' or an "
            "[experts.endpoint] table (a model server)"
        )
    module_name, _, attr = entry.predict.partition(":")
    folder = str(spec.folder)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module = _import_beside(spec.folder, module_name)
    except Exception as err:  # the user's module may fail in any way while importing
        raise SpecError(
            f"expert {entry.name!r}: cannot import module {module_name!r} from predict = "
            f"{entry.predict!r} ({err}); put {module_name}.py beside the spec or install it"
        ) from None
    finally:
        if added:
            sys.path.remove(folder)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(
                f"expert {entry.name!r}: module {module_name!r} has no attribute {attr!r} (predict "
                f"= {entry.predict!r})"
            )
        obj = getattr(obj, part)
    try:
        expert = as_expert(obj, entry.labels)
    except (TypeError, ValueError) as err:
        raise SpecError(f"expert {entry.name!r}: {err}") from None
    if list(expert.labels) != list(entry.labels):
        raise SpecError(
            f"expert {entry.name!r}: the spec lists labels {entry.labels} but the estimator's "
            f"classes are {list(expert.labels)}; list them in the order of its output columns"
        )
    return expert


def _import_beside(folder: Path, module_name: str) -> Any:
    """Import a module, preferring the file beside the spec over one of the same name already
    imported (two specs may each ship an ``experts.py``)."""
    local = folder / (module_name.replace(".", "/") + ".py")
    if not local.is_file():
        return importlib.import_module(module_name)
    unique = f"_protofuse_spec_{abs(hash(str(local)))}_{module_name.replace('.', '_')}"
    if unique in sys.modules:
        return sys.modules[unique]
    loader_spec = importlib.util.spec_from_file_location(unique, local)
    if loader_spec is None or loader_spec.loader is None:  # not for a .py file, but typed so
        raise ImportError(f"{local} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[unique] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[unique]
        raise
    return module


def load_array(path: Path, what: str, mmap: bool = False) -> np.ndarray:
    """A 2-D finite float32 array from a ``.npy`` file, with errors that name the file.

    ``mmap``: memory-map a file already stored as float32 instead of reading a copy (clients of
    one machine that share a query file then share its pages)."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise SpecError(f"{what}: file {path} not found") from None
    except ValueError as err:
        raise SpecError(
            f"{what}: {path} is not a plain .npy array ({err}); save it with numpy.save"
        ) from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.shape[0] == 0:
        raise SpecError(
            f"{what}: {path} holds shape {getattr(arr, 'shape', None)}, expected (n, d) with n >= "
            "1: one flattened input per row"
        )
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise SpecError(f"{what}: {path} must hold finite real numbers")
    return arr.astype(np.float32, copy=not mmap)


def collect_triples(spec: Spec) -> Triples:
    """Query every expert of the spec on its queries; experts sharing a file share the inputs."""
    arrays: dict[Path, np.ndarray] = {}
    for i, entry in enumerate(spec.experts):
        path = spec.queries_path(entry)
        if path not in arrays:
            arrays[path] = load_array(path, f"experts[{i}].queries ({entry.name})")
    widths = {x.shape[1] for x in arrays.values()}
    if len(widths) > 1:
        raise SpecError(
            f"experts' queries have different widths {sorted(widths)}; every input must have the "
            "same number of features"
        )
    if spec.data.image_shape is not None:
        size = image_size(spec.data.image_shape)
        if size not in widths:
            raise SpecError(
                f"data.image_shape {list(spec.data.image_shape)} has {size} values per image but "
                f"the queries have {widths.pop()} features; fix image_shape or the queries"
            )
    pool_ids = {path: i for i, path in enumerate(arrays)}
    names, labels, queries, outputs, pools = [], [], [], [], []
    for entry in spec.experts:
        path = spec.queries_path(entry)
        names.append(entry.name)
        labels.append(tuple(entry.labels))
        queries.append(arrays[path])
        outputs.append(query_expert(resolve_expert(spec, entry), arrays[path], entry.name))
        pools.append(pool_ids[path])
    return assemble(names, labels, queries, outputs, shared=pools)


def likelihood_for(spec: Spec, triples: Triples) -> str:
    """The generative decoder's likelihood: as set, or Bernoulli for images in [0, 1]."""
    in_unit = bool(triples.x.min() >= 0 and triples.x.max() <= 1)
    if spec.data.likelihood == "bernoulli" and not in_unit:
        raise SpecError(
            "data.likelihood = 'bernoulli' needs inputs in [0, 1]; scale the queries or use "
            "'gaussian'"
        )
    if spec.data.likelihood != "auto":
        return spec.data.likelihood
    return "bernoulli" if spec.data.image_shape is not None and in_unit else "gaussian"


def cached_answers(spec: Spec, entry: ExpertEntry, x: np.ndarray, cache_dir: Path) -> np.ndarray:
    """The expert's answers on x, asking the black box only once per query set.

    Answers are cached on the client's disk, keyed by the queries' bytes, the expert's address and
    its labels, so a restarted client or a later round never queries the black box again; a
    changed query file or expert gets a new entry. Written atomically (a crash leaves no half file).
    """
    key = hashlib.sha256()
    key.update(np.ascontiguousarray(x).tobytes())
    key.update(
        json.dumps(
            [
                entry.name,
                entry.predict,
                entry.endpoint.model_dump() if entry.endpoint else None,
                list(entry.labels),
            ]
        ).encode()
    )
    path = Path(cache_dir) / f"{entry.name}-{key.hexdigest()[:24]}.npy"
    if path.is_file():
        answers = np.load(path, allow_pickle=False)
        if answers.shape == (len(x), len(entry.labels)):
            return answers
    answers = query_expert(resolve_expert(spec, entry), x, entry.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, answers)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return answers
